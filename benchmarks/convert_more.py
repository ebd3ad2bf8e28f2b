"""Two more conversions into blocks: the ViT label denoiser (top-1 against fine-tuning steps) and the digits DiT
fine-tuned on another domain (digits-thick), with convert_digits.py's protocol.

    python benchmarks/convert_more.py vit --out runs/convert-vit [--source-steps 800] [--points 100,300]
    python benchmarks/convert_more.py thick --out runs/convert-digits-thick [--source-steps 800] [--points 100,300]

Both: the preset at B=1 trained --source-steps steps on the 8x8 digits, converted into B=3 blocks by `depth`
and by `copy`, each fine-tuned K steps per block (K in --points, in `--resume` legs), next to B=3 from scratch
and the source fine-tuned end to end K and 3K steps (equal compute with depth's and copy's K; see
convert_digits.py).

vit: presets/digits-vit.json (model.mode=diffusion). Score: held-out top-1 of `diffusionblocks evaluate` with
    --steps 3 for every model (B=3's default: one step per block), so that copy at step 0 runs the source's
    network on the source's three noise levels; the source is also evaluated at its own default (1 step).
thick: presets/digits-dit.json; the fine-tuning runs on data.dataset=digits-thick. Score: `evaluate`'s conditional
    accuracy and FD (for a run on digits-thick, against the thick held-out images), and modular.py's judges on
    --num samples of the same sampler and seed: the fraction the digits/digits-thick domain judge calls thick and
    the FD to each domain's held-out images in that domain's reference-classifier features.
Every training and evaluation runs in a fresh process, except the judges; rerunning with the same --out skips
what is done. Writes OUT/results.json and OUT/report.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from convert_digits import (B, db, evaluate, fine_tune_legs, finetune_plans, open_results, result_rows,
                            source_and_starts, timing)
from modular import Judges

THICK = "digits-thick"


def evaluate_vit(run: Path, out: Path, steps: int = B) -> dict:
    """Held-out top-1 of `diffusionblocks evaluate --steps STEPS`."""
    if not (out / "evaluation.json").is_file():
        db("evaluate", str(run), "--steps", str(steps), "--no-progress", "--out", str(out))
    r = json.loads((out / "evaluation.json").read_text())
    return {"top1": r["top1"], "eval_steps": r["steps"], "inference_s": r["inference_s"]}


def judged(judges: Judges, run: Path, num: int) -> dict:
    """modular.py's judges on num samples of run: the fraction called thick, FD to each domain."""
    r, _ = judges.score(run, num, profile=False)
    return {"thick_fraction": r["in_domain"][THICK], "fd_digits": r["fd"]["digits"], "fd_thick": r["fd"][THICK],
            "judge_conditional_accuracy": r["conditional_accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("experiment", choices=["vit", "thick"])
    p.add_argument("--out", required=True)
    p.add_argument("--source-steps", type=int, default=800)
    p.add_argument("--points", default="100,300", help="fine-tuning steps per block at which to evaluate")
    p.add_argument("--num", type=int, default=300, help="samples per evaluation (thick)")
    p.add_argument("--conditions", default="depth,copy,scratch,e2e")
    args = p.parse_args()
    out = Path(args.out)
    results = open_results(out)
    if args.experiment == "vit":
        preset, overrides, score = "presets/digits-vit.json", (), evaluate_vit
    else:
        judges = Judges([THICK], out / "cache")
        results["judge_floors"] = judges.floors()
        preset, overrides = "presets/digits-dit.json", (f"data.dataset={THICK}",)

        def score(run: Path, where: Path) -> dict:
            return {**evaluate(run, where, args.num), **judged(judges, run, args.num)}

    src, starts = source_and_starts(out, preset, args.source_steps, results, score)
    if args.experiment == "vit":
        results["source_own_steps"] = evaluate_vit(src, out / "evals" / "source-1step", steps=1)
    plans = finetune_plans(preset, src, starts, [int(k) for k in args.points.split(",")], overrides)
    for name in args.conditions.split(","):
        start, extra, legs = plans[name]
        fine_tune_legs(out, name, start, extra, legs, results, score)
    write_report(out, args.experiment, results)


def write_report(out: Path, experiment: str, r: dict) -> None:
    src = r["source"]
    head = (f"Source (B=1, {src['steps']} steps, {src['train_time_s']:.0f} s, {src['steps_per_s']:.1f} steps/s)")
    times = ("train_time_s", "steps_per_s", "peak_train_memory_mib")
    if experiment == "vit":
        lines = ["# Converting the end-to-end digits ViT label denoiser into B=3 blocks", "",
                 f"{head}: top-1 {src['top1']:.4f} at 3 steps, {r['source_own_steps']['top1']:.4f} at its own 1.", "",
                 "| start | steps per block | top-1 | train s | steps/s | peak MiB |", "|---|---|---|---|---|---|"]
        lines += result_rows(r, lambda e: [f"{e['top1']:.4f}", *timing(e, *times)])
    else:
        lines = ["# Converting the end-to-end digits DiT into B=3 blocks, fine-tuned on digits-thick", "",
                 f"{head}: thick fraction {src['thick_fraction']:.3f}, FD to thick {src['fd_thick']:.3f}, to "
                 f"digits {src['fd_digits']:.3f}; judge floors {json.dumps(r['judge_floors'])}", "",
                 "| start | steps per block | thick fraction | evaluate: cond. acc. | evaluate: FD | FD to thick "
                 "(judge) | FD to digits (judge) | train s | steps/s | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += result_rows(r, lambda e: [f"{e['thick_fraction']:.3f}", f"{e['conditional_accuracy']:.3f}",
                                           f"{e['fd']:.3f}", f"{e['fd_thick']:.3f}", f"{e['fd_digits']:.3f}",
                                           *timing(e, *times)])
    (out / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
