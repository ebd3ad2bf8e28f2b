"""Peak training memory of B=1 against B blocks (sequential schedule, one block resident), for any config.

Each run is `diffusionblocks train` in a fresh process for a few steps per block; its train_summary.json
holds the peak (CUDA max_memory_allocated, or on a CPU the peak resident set size above the process' size
before training). Prints a table and writes memory.json next to the runs.

    python benchmarks/train_memory.py --config presets/shakespeare-mdlm.json --num-blocks 3 --steps 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--num-blocks", default="3", help="values of B to put against B=1")
    p.add_argument("--steps", type=int, default=20, help="steps per block")
    p.add_argument("--out", help="directory for the runs and memory.json (default: a temporary one)")
    p.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="train-memory-"))
    rows = []
    for B in [1, *[int(b) for b in args.num_blocks.split(",")]]:
        run = out / f"B{B}"
        subprocess.run([sys.executable, "-m", "diffusionblocks", "train", "--config", args.config, "--out", str(run),
                        "--no-progress", *args.overrides, f"blocks.num_blocks={B}", "blocks.layers_per_block=null",
                        f"train.steps_per_block={args.steps}", "train.schedule=sequential"],
                       check=True, stdout=subprocess.DEVNULL)
        s = json.loads((run / "train_summary.json").read_text())
        rows.append({"B": B, "peak_bytes": s["peak_train_memory_bytes"], "measure": s["memory_measure"],
                     "ms_per_step": [1000 * b["train_time_s"] / b["steps"] for b in s["blocks"]]})
    base = rows[0]["peak_bytes"]
    print(f"{args.config} {' '.join(args.overrides)}: peak training memory ({rows[0]['measure']})")
    print("| B | peak MiB | / B=1 | ms/step per block |\n|---|---|---|---|")
    for r in rows:
        r["ratio"] = r["peak_bytes"] / base
        print(f"| {r['B']} | {r['peak_bytes'] / 2**20:.1f} | {r['ratio']:.3f} | "
              f"{' / '.join(f'{t:.0f}' for t in r['ms_per_step'])} |")
    (out / "memory.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
