"""The main job (digits DiT, B=3) trained under each parameterization, at one short equal budget, side by side.

Each parameterization (`noise.parameterization`: EDM's preconditioning, rectified flow's v-prediction, DDPM's
eps-prediction) trains the same DiT blocks with the same seed, data stream and steps in a fresh process on one thread
(OMP_NUM_THREADS=1), then `diffusionblocks evaluate` scores it (conditional accuracy of the reference classifier, FD
and KID against the held-out digits, the chain diagnostics), with each model's own sigma grid (equal steps of its
training density, "quantile") and, with --karras, also on the same Karras grid for all. Final losses are each
block's last logged training loss: each in its own units (EDM's weighted L2, MSE on v, MSE on eps), not comparable
across rows; the oracle MSE of D (the chain diagnostics' EDM-weighted |D(y + sigma eps) - y|^2 on held-out images,
per block) is.

    python benchmarks/parameterizations.py --out runs/parameterizations [--steps 400] [--num 1000] [--karras]
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

import torch

PARAMETERIZATIONS = {
    "edm": [],
    "flow": ["noise.parameterization=flow"],
    "vp-eps": ["noise.parameterization=vp-eps"],
}


def command(args: list[str]) -> float:
    """Runs `diffusionblocks ARGS` on one thread; returns its wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffusionblocks", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def final_losses(run: Path) -> list[float]:
    """Each block's last logged training loss."""
    last: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            last[row["block"]] = row["loss"]
    return [last[b] for b in sorted(last)]


def evaluate(run: Path, out: Path, num: int, grid: str | None) -> dict:
    ev_dir = run / f"eval-{grid or 'own'}-{num}"
    if not (ev_dir / "evaluation.json").is_file():
        command(["evaluate", str(run), "--num", str(num), "--seed", "0", "--out", str(ev_dir), "--cache-dir",
                 str(out / "cache"), "--no-progress", *(["--grid", grid] if grid else [])])
    return json.loads((ev_dir / "evaluation.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/parameterizations")
    parser.add_argument("--steps", type=int, default=400, help="training steps per block (every parameterization)")
    parser.add_argument("--num", type=int, default=1000, help="samples scored by evaluate")
    parser.add_argument("--karras", action="store_true", help="also evaluate every run on the Karras grid")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, overrides in PARAMETERIZATIONS.items():
        run = out / name
        if not (run / "train_summary.json").is_file():
            wall = command(["train", "--out", str(run), "--no-progress", f"train.steps_per_block={args.steps}",
                            *overrides])
            (run / "wall_s.txt").write_text(f"{wall}\n")
        summary = json.loads((run / "train_summary.json").read_text())
        row = {"parameterization": name, "overrides": overrides, "steps_per_block": args.steps,
               "wall_s": float((run / "wall_s.txt").read_text()),
               "train_s": sum(b["train_time_s"] for b in summary["blocks"]),
               "steps_per_s": [b["steps_per_s"] for b in summary["blocks"]], "final_loss": final_losses(run)}
        for grid in ["own", *(["karras"] if args.karras else [])]:
            ev = evaluate(run, out, args.num, None if grid == "own" else grid)
            row[grid] = {"conditional_accuracy": ev["conditional_accuracy"], "fd": ev["fd"], "kid": ev["kid"],
                         "fd_real_floor": ev["fd_real_floor"], "sampling_s": ev["sampling_s"],
                         "oracle_weighted_mse": [b["oracle_weighted_mse"] for b in ev["chain"]["per_block"]],
                         "chain_accuracy": [b["chain_accuracy"] for b in ev["chain"]["per_block"]],
                         "sigma_ranges": [b["sigma_range"] for b in ev["chain"]["per_block"]]}
        rows.append(row)
        print(json.dumps(row), flush=True)

    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, one thread per "
             f"process. {args.steps} steps per block, seed 0; evaluate --num {args.num} --seed 0.", "",
             "| parameterization | grid | cond. acc. | FD | KID | final loss per block (own units) | oracle MSE of D "
             "per block | train s | steps/s per block |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for grid in ["own", *(["karras"] if args.karras else [])]:
            e = r[grid]
            lines.append(f"| {r['parameterization']} | {grid} | {e['conditional_accuracy']:.4f} | {e['fd']:.3f} | "
                         f"{e['kid']:.4f} | {' / '.join(f'{x:.4f}' for x in r['final_loss'])} | "
                         f"{' / '.join(f'{x:.4f}' for x in e['oracle_weighted_mse'])} | {r['train_s']:.1f} | "
                         f"{' / '.join(f'{s:.1f}' for s in r['steps_per_s'])} |")
    lines += ["", f"Real-vs-real floor FD: {rows[0]['own']['fd_real_floor']:.3f}."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
