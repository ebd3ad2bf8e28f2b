"""How long the main job takes, and how good its samples are, for several sizes of it, side by side.

Each candidate is the main job (`diffusionblocks train`, the digits DiT, B=3) with some overrides. It is
trained in a fresh process (wall time from start to exit, steps/s per block from its train_summary.json),
then scored by `diffusionblocks evaluate` (1000 samples, seed 0: conditional accuracy, FD, KID against
the held-out digits). The first candidate is the reference: every other wall time is also given as a
ratio to it, measured in the same run, so that it can be carried to a slower or faster machine.

    python benchmarks/main_job_size.py --out runs/main-job-size [--candidates FILE.json] [--repeats 1]

FILE.json: {"name": ["section.field=value", ...], ...} (or {"name": {"overrides": [...], "repeats": N}}); without it,
the candidates below.
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


def _size(width: int, batch: int, steps: int, lr: float) -> list[str]:
    return [f"model.hidden_size={width}", f"train.batch_size={batch}", f"train.steps_per_block={steps}",
            f"train.lr={lr}"]


# The candidates tried for issue 14 (all B=3, 6 layers); the last is the main job since.
CANDIDATES = {
    "before: width 128, batch 128, 1200 steps, lr 1e-3": _size(128, 128, 1200, 1e-3),
    "width 128, batch 64, 1000 steps, lr 1e-3": _size(128, 64, 1000, 1e-3),
    "width 128, batch 64, 700 steps, lr 2e-3": _size(128, 64, 700, 2e-3),
    "width 96, batch 64, 1000 steps, lr 1e-3": _size(96, 64, 1000, 1e-3),
    "width 96, batch 64, 1000 steps, lr 2e-3": _size(96, 64, 1000, 2e-3),
    "width 96, batch 64, 800 steps, lr 2e-3 (the main job)": _size(96, 64, 800, 2e-3),
}


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffusionblocks", *cmd], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/main-job-size")
    parser.add_argument("--candidates", help="JSON file of {name: [overrides]} (default: the built-in list)")
    parser.add_argument("--repeats", type=int, default=1, help="trainings per candidate (wall time: the median)")
    parser.add_argument("--num", type=int, default=1000, help="samples scored by evaluate")
    args = parser.parse_args()
    candidates = json.loads(Path(args.candidates).read_text()) if args.candidates else CANDIDATES
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, spec) in enumerate(candidates.items()):
        overrides, repeats = (spec, args.repeats) if isinstance(spec, list) else (spec["overrides"], spec["repeats"])
        walls = []
        for r in range(repeats):
            run_dir = out / f"c{i}-r{r}"
            if not (run_dir / "train_summary.json").is_file():
                walls.append(run(["train", "--out", str(run_dir), "--no-progress", *overrides]))
                (run_dir / "wall_s.txt").write_text(f"{walls[-1]}\n")
            else:
                walls.append(float((run_dir / "wall_s.txt").read_text()))
        run_dir = out / f"c{i}-r0"
        summary = json.loads((run_dir / "train_summary.json").read_text())
        ev_dir = run_dir / f"eval-{args.num}"
        if not (ev_dir / "evaluation.json").is_file():
            run(["evaluate", str(run_dir), "--num", str(args.num), "--seed", "0", "--out", str(ev_dir),
                 "--cache-dir", str(out / "cache"), "--no-progress"])
        ev = json.loads((ev_dir / "evaluation.json").read_text())
        rows.append({"name": name, "overrides": overrides, "wall_s": walls, "wall_s_median": median(walls),
                     "steps_per_s": [b["steps_per_s"] for b in summary["blocks"]],
                     "train_s": sum(b["train_time_s"] for b in summary["blocks"]),
                     "conditional_accuracy": ev["conditional_accuracy"], "fd": ev["fd"], "kid": ev.get("kid"),
                     "fd_real_floor": ev.get("fd_real_floor")})
        print(json.dumps(rows[-1]), flush=True)
    ref = rows[0]
    lines = ["# The main job's size: wall time and sample quality\n",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
             f"torch {__import__('torch').__version__}. Wall time: `diffusionblocks train` from start to exit "
             f"(median of the repeats given); quality: `diffusionblocks evaluate --num {args.num} --seed 0`.\n",
             "| candidate | wall s | x reference | steps/s per block | cond. acc. | FD | FD / reference FD |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['wall_s_median']:.0f} | {r['wall_s_median'] / ref['wall_s_median']:.2f} | "
                     f"{' / '.join(f'{s:.1f}' for s in r['steps_per_s'])} | {r['conditional_accuracy']:.4f} | "
                     f"{r['fd']:.3f} | {r['fd'] / ref['fd']:.2f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
