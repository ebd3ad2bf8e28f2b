"""End-to-end vs DiffusionBlocks at equal compute: runs `diffusionblocks compare` on a preset and prints its table.

    python benchmarks/compare_e2e.py --preset digits   # about 20 minutes on a 2-core CPU
    python benchmarks/compare_e2e.py --preset mnist    # about 30 minutes on a 2-core CPU (../shared/data/mnist)

The report directory (report.md, report.json, plots) is kept; rerunning with --resume finishes an
interrupted comparison without retraining what is done.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from diffusionblocks.cli import main as cli

PRESETS = Path(__file__).resolve().parents[1] / "presets"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--out", help="report directory (default: runs/bench-compare-<preset>)")
    parser.add_argument("--num-blocks", default="2,3,4")
    parser.add_argument("--num", type=int, default=1000, help="samples per run")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = args.out or f"runs/bench-compare-{args.preset}"
    argv = ["compare", "--config", str(PRESETS / f"{args.preset}-dit.json"), "--out", out, "--num-blocks",
            args.num_blocks, "--num", str(args.num), "--no-progress", *args.overrides]
    if args.resume:
        argv = ["compare", "--out", out, "--resume", "--num-blocks", args.num_blocks, "--num", str(args.num),
                "--no-progress"]
    t0 = time.perf_counter()
    code = cli(argv)
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
