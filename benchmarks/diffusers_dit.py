"""diffusers' DiTTransformer2DModel as the layers of the blocks, against our own DiT at the same size and compute.

Trains presets/digits-dit.json (our DiT: 6 layers of width 96, 4 heads, patch 2) and
presets/digits-diffusers-dit.json (diffusers' DiT of the same shape: 4 heads x 24 = 96, 6 layers), both B=3 with the
same steps, batch, optimiser and seed, each in a fresh process with one thread; evaluates both with
`diffusionblocks evaluate` (conditional accuracy, FD, KID against the held-out digits); prints the figures, the steps/s
of each block (in the runs, and of the bare step timed in alternation, which a shared machine's load slows alike),
the run's recorded peak training memory and the parameter counts, and writes them as JSON.

    OMP_NUM_THREADS=1 python benchmarks/diffusers_dit.py [--out DIR] [--num 1000] [section.field=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffusionblocks.tasks import get_task, load_config, read_config
from diffusionblocks.train import init_block_state, train_step

PRESETS = {"ours (models/dit.py)": "presets/digits-dit.json",
           "diffusers DiTTransformer2DModel": "presets/digits-diffusers-dit.json"}


def run(args: list[str]) -> float:
    """`diffusionblocks ARGS` in a fresh process with one thread; its wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffusionblocks", *args], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - t0


def parameter_counts(run_dir: Path) -> list[int]:
    """Parameters of each block of a run, as its task builds them."""
    cfg = read_config(run_dir)
    task = get_task(cfg.task)
    return [sum(p.numel() for p in task.build_block(cfg, b).parameters()) for b in range(cfg.blocks.num_blocks)]


def interleaved_speed(rounds: int, steps: int) -> dict[str, list[float]]:
    """Steps/s of the bare training step of block 1 of each preset, timed in this process in alternation (round r
    times `steps` steps of each model), so that the other jobs of a shared machine slow both alike; per round."""
    states = {}
    for name, preset in PRESETS.items():
        cfg = load_config(preset)
        task = get_task(cfg.task)
        data = task.load_data(cfg).train
        states[name] = (task, cfg, init_block_state(task, cfg, 1, torch.device("cpu")),
                        task.batch_sampler(cfg, data, 1))
    speed = {name: [] for name in PRESETS}
    for _ in range(rounds):
        for name, (task, cfg, state, sampler) in states.items():
            train_step(task, state, cfg, task.partition(cfg), sampler, torch.device("cpu"))  # warm
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(task, state, cfg, task.partition(cfg), sampler, torch.device("cpu"))
            speed[name].append(steps / (time.perf_counter() - t0))
    return speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides applied to both runs")
    parser.add_argument("--out", default="runs/bench-diffusers-dit", help="directory for the runs")
    parser.add_argument("--num", type=int, default=1000, help="samples evaluate scores")
    parser.add_argument("--skip-train", action="store_true", help="evaluate the runs already in --out")
    parser.add_argument("--skip-eval", action="store_true", help="read the evaluations already in the runs")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the interleaved step timing")
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)

    report = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, OMP_NUM_THREADS=1, "
                         f"torch {torch.__version__}", "overrides": args.overrides, "num_samples": args.num, "runs": {}}
    for name, preset in PRESETS.items():
        run_dir = out / Path(preset).stem
        wall = None
        if not args.skip_train:
            wall = run(["train", "--config", preset, "--out", str(run_dir), "--no-progress", *args.overrides])
        eval_dir = run_dir / f"eval-n{args.num}"
        t0 = time.perf_counter()
        if not args.skip_eval:
            run(["evaluate", str(run_dir), "--num", str(args.num), "--out", str(eval_dir), "--overwrite",
                 "--no-progress"])
        eval_s = time.perf_counter() - t0
        ev = json.loads((eval_dir / "evaluation.json").read_text())
        summary = json.loads((run_dir / "train_summary.json").read_text())
        params = parameter_counts(run_dir)
        report["runs"][name] = {
            "preset": preset,
            "conditional_accuracy": ev["conditional_accuracy"], "fd": ev["fd"], "kid": ev["kid"],
            "fd_real_floor": ev["fd_real_floor"],
            "steps_per_s": [round(b["steps_per_s"], 2) for b in summary["blocks"]],
            "median_steps_per_s": round(statistics.median(b["steps_per_s"] for b in summary["blocks"]), 2),
            "steps_per_block": summary["blocks"][0]["steps"],
            "train_wall_s": wall if wall is not None else summary.get("wall_time_s"),
            "peak_train_memory_mib": (summary["peak_train_memory_bytes"] / 2 ** 20
                                      if summary.get("peak_train_memory_bytes") is not None else None),
            "parameters_per_block": params, "parameters": sum(params),
            "evaluate_s": None if args.skip_eval else eval_s,
        }
    speed = interleaved_speed(args.rounds, 30)
    for name, per_round in speed.items():
        report["runs"][name]["interleaved_steps_per_s"] = [round(v, 2) for v in per_round]
        report["runs"][name]["interleaved_median_steps_per_s"] = round(statistics.median(per_round), 2)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    ours, theirs = report["runs"].values()
    print(f"\n{report['machine']}; {args.num} samples; B=3, {ours['steps_per_block']} steps per block")
    print(f"{'model':34s} {'cond. acc.':>10s} {'FD':>7s} {'KID':>8s} {'run steps/s':>11s} {'step/s alt.':>11s} "
          f"{'train s':>8s} {'peak MiB':>9s} {'params':>9s}")
    for name, r in report["runs"].items():
        mem = f"{r['peak_train_memory_mib']:.0f}" if r["peak_train_memory_mib"] is not None else "n/a"
        print(f"{name:34s} {r['conditional_accuracy']:10.4f} {r['fd']:7.3f} {r['kid']:8.4f} "
              f"{r['median_steps_per_s']:11.2f} {r['interleaved_median_steps_per_s']:11.2f} {r['train_wall_s']:8.0f} "
              f"{mem:>9s} {r['parameters']:9d}")
    print(f"diffusers vs ours: FD {theirs['fd'] / ours['fd'] - 1:+.1%} "
          f"(within 10%: {theirs['fd'] <= 1.1 * ours['fd']}), "
          f"cond. acc. {100 * (theirs['conditional_accuracy'] - ours['conditional_accuracy']):+.2f} points "
          f"(within 1: {theirs['conditional_accuracy'] >= ours['conditional_accuracy'] - 0.01}), "
          f"steps/s x{theirs['interleaved_median_steps_per_s'] / ours['interleaved_median_steps_per_s']:.2f} "
          "(alternating timing), "
          f"parameters x{theirs['parameters'] / ours['parameters']:.2f}")


if __name__ == "__main__":
    main()
