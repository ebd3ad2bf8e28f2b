"""transformers' Llama layers as the trunk (`model.backbone=transformers`) against our own, at the size of our
Shakespeare presets: held-out BPC at equal compute, steps/s, parameters.

    OMP_NUM_THREADS=1 python benchmarks/hf_llama.py --out runs/hf-llama --steps 200

For presets/shakespeare-arlm.json (B=3 denoising blocks of 2 Llama layers each) and presets/shakespeare-mdlm.json
(B=3 blocks of 2 layers; ours are DiT layers with learned positions, transformers' Llama layers with rotary ones),
both backbones are trained side by side, each in a fresh `diffusionblocks train` process on one thread, for --steps
optimiser steps per block of the same batches (same seed, batch, learning-rate schedule; --steps shortens the
presets' budget), then
- arlm: held-out next-token bits per character (block 0 at sigma_max, every held-out window of 64, as `evaluate`);
- mdlm: the held-out ELBO in bits per character (12 strata of t, --repeats estimates, the first --windows windows),
with each block's median steps/s over its logged intervals (the two trainings share the machine's load) and the
parameters of a block; then the bare training step of block 0 of each, timed alternately in this process (medians
over --speed-repeats). Writes report.json in
--out and prints a table; rerunning skips the trainings that are done.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import torch

from diffusionblocks import precision
from diffusionblocks.chain_likelihood import next_token_bits
from diffusionblocks.pretrained import from_pretrained
from diffusionblocks.seeding import make_generator
from diffusionblocks.tasks import apply_overrides, get_task, load_config
from diffusionblocks.tasks.masked_diffusion import evaluate_bpc
from diffusionblocks.text import held_out_windows

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {"arlm": ROOT / "presets" / "shakespeare-arlm.json", "mdlm": ROOT / "presets" / "shakespeare-mdlm.json"}
BACKBONES = ("ours", "transformers")


def train(runs: dict[str, Path], preset: Path, steps: int, log: Path) -> None:
    """Trains the runs {backbone: run directory} not yet trained, side by side (one process each, one thread): under
    the same load from other jobs, so that their steps/s compare."""
    procs = []
    for backbone, run in runs.items():
        if (run / "train_summary.json").is_file():
            continue
        args = ["train", "--config", str(preset), "--out", str(run), "--no-progress", f"model.backbone={backbone}",
                f"train.steps_per_block={steps}", "sample.num=0", "train.checkpoint_every=100000"]
        f = open(log.with_name(f"log-{run.name}.txt"), "a")
        f.write(f"$ diffusionblocks {' '.join(args)}\n")
        f.flush()
        procs.append((subprocess.Popen([sys.executable, "-m", "diffusionblocks", *args], stdout=f, stderr=f,
                                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}), f))
    for proc, f in procs:
        if proc.wait() != 0:
            raise SystemExit(f"training failed: see {f.name}")
        f.close()


def cost(run: Path) -> dict:
    """Per block: the median steps/s over its logged intervals and its training time; the parameters of block 0."""
    summary = json.loads((run / "train_summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    B = len(summary["blocks"])
    per_block = [median(r["steps_per_s"] for r in rows if r["block"] == b and r["steps_per_s"]) for b in range(B)]
    model, _ = from_pretrained(run)
    return {"steps_per_s": per_block, "train_s": sum(b["train_time_s"] for b in summary["blocks"]),
            "params_per_block": sum(p.numel() for p in model.blocks[0].parameters()),
            "trunk_params_per_block": sum(p.numel() for n, p in model.blocks[0].named_parameters()
                                          if "layers." in n)}


def bpc(task: str, run: Path, windows: int, repeats: int) -> dict:
    model, cfg = from_pretrained(run)
    data = get_task(cfg.task).load_run_data(cfg, run)
    w = held_out_windows(data.test, cfg.model.seq_len)
    with torch.no_grad():
        if task == "arlm":
            return {"bpc": next_token_bits(model, w) / data.test.chars_per_token, "num_windows": len(w)}
        r = evaluate_bpc(model, w[:windows], strata=12, repeats=repeats)
    return {"bpc": r["bpc"], "bpc_se": r["bpc_se"], "num_windows": r["num_windows"]}


def step_speed(preset: Path, steps: int, repeats: int) -> dict[str, float]:
    """Steps/s of the bare training step (loss, backward, AdamW) of block 0 of each backbone at the preset's size and
    batch, on one thread in this process: `repeats` timings of `steps` steps, the backbones alternating, medians."""
    times: dict[str, list[float]] = {b: [] for b in BACKBONES}
    setups = {}
    for backbone in BACKBONES:
        cfg = apply_overrides(load_config(preset), [f"model.backbone={backbone}"])
        task = get_task(cfg.task)
        block = task.build_block(cfg, 0, make_generator(cfg.train.seed, 0, "init")).train()
        data = task.load_data(cfg)
        sampler = task.batch_sampler(cfg, data.train, 0)
        partition = task.partition(cfg)
        inputs = [task.loss_inputs(cfg, partition, 0, sampler.batch(i), make_generator(cfg.train.seed, 0, i, "noise"))
                  for i in range(steps)]
        setups[backbone] = block, torch.optim.AdamW(block.parameters(), lr=1e-4, foreach=True), inputs
    for _ in range(repeats + 1):  # the first round warms up
        for backbone, (block, opt, inputs) in setups.items():
            t = time.perf_counter()
            for kw in inputs:
                opt.zero_grad(set_to_none=True)
                block.loss(**kw).mean().backward()
                opt.step()
            times[backbone].append(time.perf_counter() - t)
    return {b: steps / median(ts[1:]) for b, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/hf-llama")
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps per block")
    parser.add_argument("--windows", type=int, default=1000, help="held-out windows of the mdlm ELBO")
    parser.add_argument("--repeats", type=int, default=2, help="independent ELBO estimates (mdlm)")
    parser.add_argument("--tasks", default="arlm,mdlm")
    parser.add_argument("--speed-steps", type=int, default=10, help="steps per timing of the bare step")
    parser.add_argument("--speed-repeats", type=int, default=5, help="timings of the bare step, per backbone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    precision.flush_denormals()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    report = {"steps_per_block": args.steps, "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 thread",
              "torch": torch.__version__, "results": {}}
    for task in args.tasks.split(","):
        runs = {backbone: out / f"{task}-{backbone}" for backbone in BACKBONES}
        train(runs, PRESETS[task], args.steps, out / "log.txt")
        for backbone, run in runs.items():
            report["results"][f"{task}/{backbone}"] = {**cost(run), **bpc(task, run, args.windows, args.repeats)}
            print(task, backbone, json.dumps(report["results"][f"{task}/{backbone}"]), flush=True)
        report["results"][f"{task}/step_speed"] = step_speed(PRESETS[task], args.speed_steps, args.speed_repeats)
        print(task, "bare step, steps/s:", json.dumps(report["results"][f"{task}/step_speed"]), flush=True)
    report["wall_s"] = time.time() - t0
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'task':6} {'backbone':13} {'BPC':>7} {'vs ours':>8} {'steps/s per block':>24} {'train s':>8} "
          f"{'params/block':>12}")
    for key, r in report["results"].items():
        task, backbone = key.split("/")
        if backbone == "step_speed":
            print(f"{task:6} bare step (steps/s, medians): " + ", ".join(f"{b} {v:.2f}" for b, v in r.items()))
            continue
        ours = report["results"].get(f"{task}/ours", r)["bpc"]
        sps = ", ".join(f"{s:.1f}" for s in r["steps_per_s"])
        print(f"{task:6} {backbone:13} {r['bpc']:7.4f} {100 * (r['bpc'] / ours - 1):+7.2f}% {sps:>24} "
              f"{r['train_s']:8.0f} {r['params_per_block']:12,d}")
    print(f"wall {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
