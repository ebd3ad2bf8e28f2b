"""The autoregressive LM in diffusion mode converted into blocks: held-out bits through the chain at step 0 and
after fine-tuning (a shortened run for a 2-core CPU).

    python benchmarks/convert_arlm.py --out runs/convert-arlm [--source-steps 600] [--points 100,300]

The source is presets/shakespeare-arlm.json at B=1 (6 Llama layers of width 128, denoising the next character's
embedding), trained --source-steps steps; it is converted into B=3 blocks by depth and by copy, and each is
fine-tuned K steps per block (K in --points, in legs of `train --resume`), next to the end-to-end source
fine-tuned K and 3K steps. Each is evaluated by `diffusionblocks evaluate` on --windows held-out windows: the
next-token bits of block 0 at sigma_max and through the chain (softmax bridge, B steps: each block once, the
run's own inference), and distinct-4 of --prompts continuations. Writes OUT/results.json and OUT/report.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from convert_digits import db, fine_tune_legs, result_rows, summary_of, timing, trained

PRESET = "presets/shakespeare-arlm.json"
B = 3


def evaluate(run: Path, out: Path, args) -> dict:
    if not (out / "evaluation.json").is_file():
        db("evaluate", str(run), "--windows", str(args.windows), "--prompts", str(args.prompts), "--new", "100",
           "--bridges", "softmax", "--speed-prompts", "1", "--no-progress", "--out", str(out))
    r = json.loads((out / "evaluation.json").read_text())
    chain = r.get("chain", {}).get("softmax")
    final = chain[-1]["chain_bits"] if chain else r["bits_per_token"]
    samples = next(iter(r["samples"].values()))
    return {"bpc_block0_at_sigma_max": r["bpc"], "bpc_chain": final / r["chars_per_token"],
            "distinct_4": samples["distinct_4"], "chars_per_s": samples["chars_per_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--source-steps", type=int, default=600)
    p.add_argument("--points", default="100,300")
    p.add_argument("--windows", type=int, default=200)
    p.add_argument("--prompts", type=int, default=8)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    src = out / "source"
    if not trained(src, args.source_steps):
        db("train", "--config", PRESET, "--out", str(src), "--no-progress", "blocks.num_blocks=1",
           f"train.steps_per_block={args.source_steps}")
    results["source"] = {**summary_of(src), **evaluate(src, out / "evals" / "source", args)}
    starts = {}
    for init in ("depth", "copy"):
        starts[init] = out / f"{init}{B}"
        if not starts[init].is_dir():
            db("convert", str(src), "--num-blocks", str(B), "--init", init, "--out", str(starts[init]))
        results[f"{init}@0"] = evaluate(starts[init], out / "evals" / f"{init}-0", args)
        path.write_text(json.dumps(results, indent=2) + "\n")
    points = [int(k) for k in args.points.split(",")]
    plans = {"depth": (starts["depth"], points), "copy": (starts["copy"], points),
             "e2e": (src, sorted({*points, *(B * k for k in points)}))}
    for name, (start, legs) in plans.items():
        fine_tune_legs(out, name, ["--from", str(start)], ["sample.num=1", "sample.new_chars=20"], legs, results,
                       lambda run, where: evaluate(run, where, args))
    s = results["source"]
    lines = ["| start | steps per block | BPC through the chain | BPC of block 0 at sigma_max | distinct-4 | train s | "
             "steps/s |", "|---|---|---|---|---|---|---|",
             f"| source (B=1) | {s['steps']} | {s['bpc_chain']:.3f} | {s['bpc_block0_at_sigma_max']:.3f} | "
             f"{s['distinct_4']:.3f} | {s['train_time_s']:.0f} | {s['steps_per_s']:.1f} |"]
    lines += result_rows(results, lambda e: [f"{e['bpc_chain']:.3f}", f"{e['bpc_block0_at_sigma_max']:.3f}",
                                             f"{e['distinct_4']:.3f}", *timing(e, "train_time_s", "steps_per_s")])
    (out / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
