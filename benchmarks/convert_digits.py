"""A trained end-to-end model into blocks, measured on the digits DiT: the conversion gap at step 0 and quality
against fine-tuning steps.

    python benchmarks/convert_digits.py --out runs/convert-digits [--source-steps 1600] [--points 100,300,800]

The source is presets/digits-dit.json at B=1 (DiT, 6 layers of width 96), trained --source-steps steps. It is
converted into B=3 blocks by `depth` (2 layers each) and by `copy` (6 layers each).

1. Gap: on held-out images, the EDM loss lambda(sigma) |D(y + sigma eps) - y|^2 per noise bin (the same images,
   noise and labels for every model) of the source, and of the converted chains (each sigma by the block that owns
   it), before any fine-tuning.
2. Fine-tuning: from each start, every block fine-tuned K steps (K in --points, in legs: `train --resume` with a
   larger train.steps_per_block, bit-identical to one go), evaluated (`diffusionblocks evaluate`: conditional
   accuracy and FD of --num class-conditional samples, Euler 50 steps, guidance 2) after each leg:
   depth, depth + distillation (train.distill_weight=1), copy, B=3 from scratch, and the end-to-end source
   fine-tuned K steps (the compute of depth's K steps per block, which run L/B layers each) and 3K steps (copy's).
Every training and evaluation runs in a fresh process; times are read from its train_summary.json. Rerunning with
the same --out skips what is done. Writes OUT/results.json and OUT/report.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from diffusionblocks.data import load_image_data
from diffusionblocks.precond import append_dims, loss_weight
from diffusionblocks.pretrained import from_pretrained
from diffusionblocks.seeding import make_generator
from diffusionblocks.tasks import read_config

PRESET = "presets/digits-dit.json"
B = 3


def db(*argv: str) -> None:
    """`diffusionblocks ARGV` in a fresh process."""
    subprocess.run([sys.executable, "-m", "diffusionblocks", *argv], check=True, stdout=subprocess.DEVNULL)


def trained(run: Path, steps: int) -> bool:
    summary = run / "train_summary.json"
    return summary.is_file() and all(b["steps"] >= steps for b in json.loads(summary.read_text())["blocks"])


def fresh_block(z: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 0.5, **cond) -> torch.Tensor:
    """A block at initialisation (adaLN-Zero: F = 0): D = c_skip z."""
    return append_dims(sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2), z.ndim) * z


@torch.no_grad()
def loss_per_bin(model, y: torch.Tensor, labels: torch.Tensor, sigma_edges: torch.Tensor, repeats: int,
                 sigma_data: float = 0.5) -> list[float]:
    """Held-out lambda(sigma) |D - y|^2 / dim per bin of ln sigma (drawn uniformly in the bin), the same draws for
    every model (generators seeded by the bin and repeat)."""
    out = []
    for i in range(len(sigma_edges) - 1):
        total = 0.0
        for r in range(repeats):
            g = make_generator(0, "gap", i, r)
            lo, hi = sigma_edges[i].log(), sigma_edges[i + 1].log()
            sigma = (lo + (hi - lo) * torch.rand(len(y), generator=g, dtype=torch.float64)).exp().float()
            z = y + append_dims(sigma, y.ndim) * torch.randn(y.shape, generator=g)
            D = model(z, sigma, class_labels=labels)
            total += float((loss_weight(sigma, sigma_data) * (D - y).pow(2).flatten(1).mean(1)).mean())
        out.append(total / repeats)
    return out


def evaluate(run: Path, out: Path, num: int) -> dict:
    if not (out / "evaluation.json").is_file():
        db("evaluate", str(run), "--num", str(num), "--no-diagnostics", "--no-progress", "--out", str(out))
    r = json.loads((out / "evaluation.json").read_text())
    return {"conditional_accuracy": r["conditional_accuracy"], "fd": r["fd"], "fd_real_floor": r["fd_real_floor"],
            "sampling_s": r["sampling_s"]}


def summary_of(run: Path) -> dict:
    s = json.loads((run / "train_summary.json").read_text())
    t = sum(b["train_time_s"] for b in s["blocks"] if b["block"] in s["trained_now"])
    steps = sum(b["steps"] for b in s["blocks"] if b["block"] in s["trained_now"])
    return {"train_time_s": t, "steps": steps, "steps_per_s": steps / t if t else None,
            "peak_train_memory_mib": s["peak_train_memory_bytes"] / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--source-steps", type=int, default=1600)
    p.add_argument("--points", default="100,300,800", help="fine-tuning steps per block at which to evaluate")
    p.add_argument("--num", type=int, default=500, help="samples per evaluation")
    p.add_argument("--conditions", default="depth,depth-distill,copy,scratch,e2e")
    p.add_argument("--skip-finetune", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    results = open_results(out)
    results_path = out / "results.json"

    src, starts = source_and_starts(out, PRESET, args.source_steps, results,
                                    lambda run, where: evaluate(run, where, args.num))

    # 1. The conversion gap at step 0, per noise bin.
    test = load_image_data(read_config(src).data).test
    edges = torch.logspace(torch.log10(torch.tensor(0.002)), torch.log10(torch.tensor(80.0)), 13)
    results["gap"] = {"sigma_edges": edges.tolist(),
                      **{name: loss_per_bin(from_pretrained(run)[0], test.images, test.labels, edges, repeats=4)
                         for name, run in [("source", src), ("depth", starts["depth"]), ("copy", starts["copy"])]},
                      "fresh": loss_per_bin(fresh_block, test.images, test.labels, edges, repeats=4)}
    results_path.write_text(json.dumps(results, indent=2) + "\n")

    # 2. Quality against fine-tuning steps.
    points = [int(k) for k in args.points.split(",")]
    plans = finetune_plans(PRESET, src, starts, points)
    for name in [] if args.skip_finetune else args.conditions.split(","):
        start, overrides, legs = plans[name]
        fine_tune_legs(out, name, start, overrides, legs, results,
                       lambda run, where: evaluate(run, where, args.num))
    write_report(out, results)


def open_results(out: Path) -> dict:
    """OUT (created) and what OUT/results.json holds so far, with this machine recorded."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["machine"] = {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__}
    return results


def source_and_starts(out: Path, preset: str, source_steps: int, results: dict, evaluate) -> tuple[Path, dict]:
    """OUT/source (preset at B=1, trained source_steps steps) and its B-block conversions OUT/depth3, OUT/copy3,
    each evaluated with evaluate(run, directory) into results (source, depth@0, copy@0), saved to OUT/results.json."""
    src = out / "source"
    if not trained(src, source_steps):
        db("train", "--config", preset, "--out", str(src), "--no-progress", "blocks.num_blocks=1",
           f"train.steps_per_block={source_steps}")
    results["source"] = {**summary_of(src), **evaluate(src, out / "evals" / "source")}
    starts = {}
    for init in ("depth", "copy"):
        starts[init] = out / f"{init}{B}"
        if not starts[init].is_dir():
            db("convert", str(src), "--num-blocks", str(B), "--init", init, "--out", str(starts[init]))
        results[f"{init}@0"] = evaluate(starts[init], out / "evals" / f"{init}-0")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return src, starts


def finetune_plans(preset: str, src: Path, starts: dict, points: list[int], overrides: tuple[str, ...] = ()) -> dict:
    """name -> (start, overrides, legs) of every fine-tuning condition: the conversions with and without
    distillation, B blocks from scratch, and the source end to end at K and B K steps (equal compute with depth's
    and copy's K steps per block); overrides (e.g. another dataset) apply to every one."""
    more = list(overrides)
    return {"depth": (["--from", str(starts["depth"])], more, points),
            "depth-distill": (["--from", str(starts["depth"])], [*more, "train.distill_weight=1"], points),
            "copy": (["--from", str(starts["copy"])], more, points),
            "copy-distill": (["--from", str(starts["copy"])], [*more, "train.distill_weight=1"], points),
            "scratch": (["--config", preset], [*more, f"blocks.num_blocks={B}"], points),
            "e2e": (["--from", str(src)], more, sorted({*points, *(B * k for k in points)}))}


def fine_tune_legs(out: Path, name: str, start: list[str], overrides: list[str], legs: list[int], results: dict,
                   evaluate) -> None:
    """Trains OUT/name (`train START`, then `train --resume` with train.steps_per_block at each leg), evaluating it
    after each leg with evaluate(run, directory) into results["finetune"][name], saved to OUT/results.json."""
    run = out / name
    rows = results.setdefault("finetune", {}).setdefault(name, {})
    for k in legs:
        if str(k) in rows:
            continue
        if not trained(run, k):
            first = not (run / "train_summary.json").is_file()
            how = start + ["--out", str(run)] if first else ["--resume", str(run)]
            db("train", *how, "--no-progress", *overrides, f"train.steps_per_block={k}")
        rows[str(k)] = {**summary_of(run), **evaluate(run, out / "evals" / f"{name}-{k}")}
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def result_rows(r: dict, cells) -> list[str]:
    """Markdown rows of the converted starts (step 0) and of every fine-tuning leg: | start | steps | cells(e) |."""
    rows = [(init, "0", r[f"{init}@0"]) for init in ("depth", "copy")]
    rows += [(name, k, e) for name, legs in r.get("finetune", {}).items()
             for k, e in sorted(legs.items(), key=lambda kv: int(kv[0]))]
    return [f"| {name} | {k} | {' | '.join(cells(e))} |" for name, k, e in rows]


def timing(e: dict, *keys: str) -> list[str]:
    """The cells of e's training time, steps/s...; '-' for a start that did not train."""
    return [f"{e[k]:.1f}" if k in e else "-" for k in keys]


def write_report(out: Path, r: dict) -> None:
    lines = ["# Converting the end-to-end digits DiT into B=3 blocks", "",
             "## Conversion gap at step 0 (held-out EDM loss per noise bin)", "",
             "| sigma bin | source | depth | copy | fresh block (F = 0) |", "|---|---|---|---|---|"]
    g = r["gap"]
    for i in range(len(g["sigma_edges"]) - 1):
        lines.append(f"| {g['sigma_edges'][i]:.3g}-{g['sigma_edges'][i + 1]:.3g} | {g['source'][i]:.4f} | "
                     f"{g['depth'][i]:.4f} | {g['copy'][i]:.4f} | {g['fresh'][i]:.4f} |")
    src = r["source"]
    lines += ["", "## Quality against fine-tuning steps per block", "",
              f"Source (B=1, {src['steps']} steps, {src['train_time_s']:.0f} s, {src['steps_per_s']:.1f} steps/s): "
              f"conditional accuracy {src['conditional_accuracy']:.3f}, FD {src['fd']:.3f} (floor "
              f"{src['fd_real_floor']:.3f}).", "",
              "| start | steps per block | cond. acc. | FD | train s (this leg's run, all blocks) | steps/s | peak MiB |",
              "|---|---|---|---|---|---|---|"]
    lines += result_rows(r, lambda e: [f"{e['conditional_accuracy']:.3f}", f"{e['fd']:.3f}",
                                       *timing(e, "train_time_s", "steps_per_s", "peak_train_memory_mib")])
    (out / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
