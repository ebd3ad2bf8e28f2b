"""End-to-end ViT vs DiffusionBlocks classification over several training seeds, at equal compute.

    python benchmarks/classify_seeds.py --preset digits --seeds 0,1,2   # about 11 minutes per seed, 2-core CPU
    python benchmarks/classify_seeds.py --preset mnist --seeds 0        # about 30 minutes per seed

Runs `diffusionblocks compare --config presets/<preset>-vit.json train.seed=S` once per seed (a seed
whose report.json exists is read, not rerun) and prints, per seed and as mean +- std over seeds: the
end-to-end top-1, the top-1 of each B, the accuracy after each step of the chain and each block's
oracle accuracy. Seeds matter: on the 297 held-out digits one seed moves a block's accuracy by points.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from diffusionblocks.cli import main as cli

PRESETS = Path(__file__).resolve().parents[1] / "presets"


def mean_std(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):.2f} +- {100 * statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{100 * xs[0]:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (train.seed)")
    parser.add_argument("--num-blocks", default="3", help="values of B to compare with the end-to-end ViT")
    parser.add_argument("--out", help="root of the per-seed report directories (default: runs/bench-classify-<preset>)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, applied to every run")
    args = parser.parse_args()
    root = Path(args.out or f"runs/bench-classify-{args.preset}")
    seeds = [int(s) for s in args.seeds.split(",")]
    reports = {}
    for s in seeds:
        out = root / f"seed{s}"
        if not (out / "report.json").is_file():
            resume = ["--resume"] if (out / "config.json").is_file() else []
            argv = ["compare", "--out", str(out), "--num-blocks", args.num_blocks, "--no-progress", *resume]
            if not resume:
                argv += ["--config", str(PRESETS / f"{args.preset}-vit.json"), f"train.seed={s}", *args.overrides]
            if cli(argv) != 0:
                return 1
        reports[s] = json.loads((out / "report.json").read_text())["runs"]

    Bs = sorted(int(B) for B in reports[seeds[0]])
    print(f"{args.preset}: top-1 on {reports[seeds[0]]['1']['num_test']} held-out images (B=1: the plain ViT)")
    print("seed | " + " | ".join(f"B={B}" for B in Bs) + " | " + " | ".join(f"B={B} - B=1" for B in Bs[1:]))
    for s in seeds:
        top1 = {B: reports[s][str(B)]["top1"] for B in Bs}
        print(f"{s} | " + " | ".join(f"{100 * top1[B]:.2f}" for B in Bs) + " | "
              + " | ".join(f"{100 * (top1[B] - top1[1]):+.2f}" for B in Bs[1:]))
    print("mean +- std | " + " | ".join(mean_std([reports[s][str(B)]["top1"] for s in seeds]) for B in Bs) + " | "
          + " | ".join(mean_std([reports[s][str(B)]["top1"] - reports[s]["1"]["top1"] for s in seeds]) for B in Bs[1:]))
    for B in Bs[1:]:
        print(f"\nB={B}, mean over seeds: step (sigma, block): chain accuracy after the step | the block's oracle "
              f"accuracy at that sigma")
        steps = reports[seeds[0]][str(B)]["per_step"]
        for i, row in enumerate(steps):
            chain = [reports[s][str(B)]["per_step"][i]["chain_accuracy"] for s in seeds]
            oracle = [next(b["oracle_accuracy"] for b in reports[s][str(B)]["per_block"] if b["block"] == row["block"])
                      for s in seeds]
            print(f"  step {i} (sigma {row['sigma']:.3g}, block {row['block']}): {mean_std(chain)} | {mean_std(oracle)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
