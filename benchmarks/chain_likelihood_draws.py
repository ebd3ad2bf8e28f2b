"""The chain likelihood's estimate against its number of draws: does it settle, and is its reported bias the whole
of its error?

    python benchmarks/chain_likelihood_draws.py RUN --out results.json [--windows 32] [--every 1] [--draws 2,4,8,16]
        [--top-k 4] [--later-k 0] [--steer 0.25] [--line-steer 0] [--draw-steer 0.8] [--first-only-draws 4,16,64]

On one set of held-out windows spread over the split (the ones `evaluate --windows` uses), the estimate of a
trained arlm (or recurrent denoiser) run's chain likelihood at each number of start-noise draws, with its standard
errors, its estimated bias (the delta method's, and the fall from half the draws), in bits per character, and its
wall time. `--first-only-draws` measures the same with only the first token draw enumerated (every later token
drawn: `later_k=None`), the estimator of the sessions before this benchmark; `--steer 0` draws every start noise
from N(0, I) but for `--line-steer`'s share (a list, one row each: shifted along the scored token's line);
`--draw-steer` lists the shares of chains steered at the later draws the tree leaves drawn (many steps;
`SteeredDraws`), one row per share and number of draws (0: the blocks' own draws); `--every k` keeps every k-th of
the --windows windows. An estimator that holds changes by less than its standard error from its fewest
draws to its most.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from diffusionblocks.chain_likelihood import chain_likelihood
from diffusionblocks.pretrained import from_pretrained
from diffusionblocks.tasks import get_task, load_config
from diffusionblocks.tasks.text import evaluation_windows, per_character


def measure(model, windows: torch.Tensor, cfg, chars_per_token: float, num_tokens: int, draws: int, top_k: int,
            later_k: int | None, steer: float, steps: int, draw_steer: float, line_steer: float) -> dict:
    s = cfg.sample
    t0 = time.perf_counter()
    r = chain_likelihood(model, windows, steps=steps, bridge=s.bridge, sampler=s.sampler, grid=s.grid, draws=draws,
                         top_k=top_k, later_k=later_k, steer=steer, line_steer=line_steer, draw_steer=draw_steer,
                         num_tokens=num_tokens)
    seconds = time.perf_counter() - t0
    r = per_character(r, chars_per_token)
    keys = ("draws", "top_k", "later_k", "enumerated", "drawn_later", "steer", "line_steer", "draw_steer", "bpc",
            "bpc_se", "bpc_se_estimator", "bpc_bias", "bpc_fall")
    return {k: r.get(k) for k in keys} | {"seconds": round(seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's sample.steps or B)")
    p.add_argument("--draws", default="2,4,8,16")
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--later-k", type=int, default=0)
    p.add_argument("--steer", type=float, default=0.25)
    p.add_argument("--line-steer", default="0", help="shares of start noises along the scored token's line, one row "
                   "each (e.g. 0,0.5)")
    p.add_argument("--draw-steer", default="0.8", help="shares of steered later draws, one row each (e.g. 0,0.8)")
    p.add_argument("--every", type=int, default=1, help="keep every k-th of the --windows windows")
    p.add_argument("--first-only-draws", default="", help="draws for the first-draw-only estimator (none: skip)")
    args = p.parse_args()
    cfg = load_config(Path(args.run) / "config.json")
    task = get_task(cfg.task)
    data = task.load_run_data(cfg, Path(args.run))
    model, cfg = from_pretrained(args.run, torch.device("cpu"))
    windows = evaluation_windows(data.test, cfg.model.seq_len, args.windows)[::args.every]
    steps = args.steps or cfg.sample.steps or cfg.blocks.num_blocks
    cpt, V = data.test.chars_per_token, len(data.vocab)
    rows = []
    for later_k, draws_list in ((args.later_k, args.draws), (None, args.first_only_draws)):
        for draws in (int(d) for d in draws_list.split(",") if d):
            for draw_steer in (float(d) for d in args.draw_steer.split(",")):
                for line_steer in (float(d) for d in args.line_steer.split(",")):
                    rows.append(measure(model, windows, cfg, cpt, V, draws, args.top_k, later_k, args.steer, steps,
                                        draw_steer, line_steer))
                    print(json.dumps(rows[-1]), flush=True)
    report = {"run": args.run, "windows": len(windows), "steps": steps, "bridge": cfg.sample.bridge,
              "sampler": cfg.sample.sampler, "rows": rows,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
                         f"torch {torch.__version__}"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
