"""Recurrent depth, measured: Huginn's recurrence with truncated BPTT against DiffusionBlocks' one-pass denoiser of
the same prelude / core / coda shape, on tinyshakespeare, quality against the number of core iterations K.

    python benchmarks/recurrent_depth.py --out runs/recurrent [--judge auto|none|RUN] [--steps 1000] [--windows 512]
        [--mauve-iterations 1,4,16] [--mauve-prompts 500] [--mauve-new 128] [--cache-dir DIR]

1. Trains, each in a fresh `diffusionblocks train` process, presets/shakespeare-recurrent.json as Huginn
   (model.mode=huginn) and as the denoiser, both for --steps optimiser steps of the same batches (equal epochs,
   as the paper compared); then the denoiser on for as many more steps as make its training time Huginn's at the
   median steps/s of each (equal wall time: `train --resume` with more steps is the same run continued).
2. The cost of an optimiser step: steps/s, core forward passes (Huginn: the iterations it drew, recomputed from
   the same (seed, step) generators; the denoiser: one), peak training memory.
3. `diffusionblocks evaluate --iterations K --judge auto --windows 512` of each model for each K of 1,2,4,...,64 (one
   evaluation per K in RUN/eval-K{K}-w{windows}, every model at a K before the next K, each kept: a rerun after a
   kill resumes at the K it was measuring,
   merged into one row per K): held-out BPC with its
   standard error on one set of 512 windows spread evenly over the held-out split, the same for every model and K
   (Huginn: the mean of its softmax over 8 initial states; the denoiser: the chain's own likelihood,
   `chain_likelihood`, an upper bound in expectation whose bias is reported), and the samples' perplexity under the
   independent judge (`diffusionblocks.judge`: a plain causal LM of presets/shakespeare-judge.json trained on the
   training split, cached and built on first use, never one of the compared runs; its held-out BPC is reported
   beside the models'), distinct-4, longest run; at the K's of --mauve-iterations, MAUVE of --mauve-prompts
   continuations of --mauve-new characters against the held-out continuations of the same prompts, with MAUVE's
   ceiling and floor.
Writes report.md, report.json and quality_vs_iterations.png in --out; rerunning skips what is done.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import torch

from diffusionblocks.judge import judge_paragraph, mauve_table
from diffusionblocks.models.recurrent import lognormal_poisson
from diffusionblocks.seeding import make_generator
from diffusionblocks.tasks import load_config

PRESET = Path(__file__).resolve().parent.parent / "presets" / "shakespeare-recurrent.json"
KS = "1,2,4,8,16,32,64"


def cli(*args: str, log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"$ diffusionblocks {' '.join(args)}\n")
        f.flush()
        subprocess.run([sys.executable, "-m", "diffusionblocks", *args], check=True, stdout=f, stderr=f)


def cost(run: Path, huginn: bool) -> dict:
    """Steps/s (median over the logged intervals), training time, core passes per step, peak memory of a run."""
    summary = json.loads((run / "train_summary.json").read_text())
    block = summary["blocks"][0]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cfg = load_config(run / "config.json")
    steps = block["steps"]
    if huginn:  # the iterations each step drew: the first draw of its (seed, block 0, step) generator
        m = cfg.model
        core = [lognormal_poisson(m.mean_recurrence, m.recurrence_std, make_generator(cfg.train.seed, 0, s, "noise"))
                for s in range(steps)]
    else:
        core = [1] * steps
    return {"steps": steps, "train_s": block["train_time_s"], "steps_per_s": median(r["steps_per_s"] for r in rows),
            "core_passes_per_step": sum(core) / steps, "core_passes": sum(core),
            "peak_train_mem_mib": summary["peak_train_memory_bytes"] / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/recurrent")
    parser.add_argument("--judge", default=None, help="what scores the samples: auto (the independent judge), none, "
                        "or a plain autoregressive run (task arlm) (default: judge_run())")
    parser.add_argument("--cache-dir", default=None, help="the judge cache (default: $DIFFUSIONBLOCKS_CACHE or "
                        "~/.cache/diffusionblocks)")
    parser.add_argument("--mauve-iterations", default="1,4,16", help="the K's whose samples also get MAUVE")
    parser.add_argument("--mauve-prompts", type=int, default=500, help="held-out prompts continued for MAUVE (0: none)")
    parser.add_argument("--mauve-new", type=int, default=128, help="characters each MAUVE continuation adds")
    parser.add_argument("--windows", type=int, default=512, help="held-out windows spread over the split, shared by "
                        "every model and K")
    parser.add_argument("--chain-draws", type=int, default=8, help="the denoiser's start-noise draws per window")
    parser.add_argument("--top-k", type=int, default=4, help="the denoiser's enumerated first-step tokens")
    parser.add_argument("--tolerance", type=float, default=0.01, help="the denoiser's draws doubled while its "
                        "estimate's fall from half of them is above this many bits per character")
    parser.add_argument("--max-draws", type=int, default=32, help="... up to this many draws")
    parser.add_argument("--chain-batch", type=int, default=0, help="the denoiser's chains per forward pass (0: the "
                        "device's default, evaluate --chain-batch)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--iterations", default=KS)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--new", type=int, default=100)
    parser.add_argument("--train-only", action="store_true", help="stop after the training runs")
    parser.add_argument("--findings", help="a markdown file of what the numbers show, put into report.md after the "
                        "set-up (written by a person once the numbers are in)")
    args = parser.parse_args()
    args.judge = args.judge or judge_run()
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    runs = {"huginn": out / "huginn", "diffusion": out / "diffusion", "diffusion, equal time": out / "diffusion-eqtime"}
    common = [f"train.steps_per_block={args.steps}", "--no-progress"]
    for name, mode in (("huginn", "huginn"), ("diffusion", "diffusion")):
        if not (runs[name] / "train_summary.json").is_file():
            cli("train", "--config", str(PRESET), "--out", str(runs[name]), f"model.mode={mode}",
                f"name=shakespeare-{mode}", *common, log=log)
    costs = {name: cost(runs[name], name == "huginn") for name in ("huginn", "diffusion")}
    eq = runs["diffusion, equal time"]
    if not (eq / "train_summary.json").is_file() or json.loads((eq / "train_summary.json").read_text())["blocks"][0][
            "steps"] == args.steps:
        # Equal wall time from the median steps/s of each run (robust to a stretch slowed by other work).
        steps_eq = round(args.steps * costs["diffusion"]["steps_per_s"] / costs["huginn"]["steps_per_s"])
        shutil.rmtree(eq, ignore_errors=True)
        shutil.copytree(runs["diffusion"], eq)
        cli("train", "--resume", str(eq), f"train.steps_per_block={max(steps_eq, args.steps)}", "--no-progress", log=log)
    costs["diffusion, equal time"] = cost(eq, False)
    if args.train_only:
        print(json.dumps(costs, indent=1))
        return
    results = {}
    judged = args.judge.lower() != "none"
    mauve_Ks = [int(k) for k in args.iterations.split(",") if k.strip() and k.strip() in
                {m.strip() for m in args.mauve_iterations.split(",")}] if judged and args.mauve_prompts else []
    Ks = [int(k) for k in args.iterations.split(",")]
    for i in range(len(Ks)):  # every model at K before any at the next K: the cheap K's of all of them come first
        for name, run in runs.items():
            results[name] = evaluate_by_k(run, Ks[:i + 1], args, judged, mauve_Ks, log)
    for name in runs:
        print(name, json.dumps(costs[name]), flush=True)
    (out / "report.json").write_text(json.dumps({"costs": costs, "results": results}, indent=1) + "\n")
    plot(out / "quality_vs_iterations.png", results)
    write_report(out, args, costs, results, time.time() - t0)
    print((out / "report.md").read_text())


def evaluate_by_k(run: Path, Ks: list[int], args: argparse.Namespace, judged: bool, mauve_Ks: list[int],
                  log: Path) -> dict:
    """`diffusionblocks evaluate RUN` once per K of Ks (RUN/eval-K{K}-w{windows}, each kept: a killed evaluation loses
    at most the K it was measuring), merged into one evaluation: the K rows in order, the rest (judge, MAUVE bounds,
    windows) from the first K's."""
    merged = None
    for K in Ks:
        ev = run / f"eval-K{K}-w{args.windows}"
        done = (ev / "evaluation.json").is_file() and _same_judging(json.loads((ev / "evaluation.json").read_text()),
                                                                     judged, [K] if K in mauve_Ks else [])
        # An evaluation without the estimate's fall is from the estimator that drew the chain's later tokens.
        done = done and "bpc_fall" in json.loads((ev / "evaluation.json").read_text())["by_iterations"][0]
        if not done:
            cli("evaluate", str(run), "--iterations", str(K), "--judge", args.judge, "--prompts",
                str(args.prompts), "--new", str(args.new), "--windows", str(args.windows), "--chain-draws",
                str(args.chain_draws), "--top-k", str(args.top_k), "--tolerance", str(args.tolerance),
                "--max-draws", str(args.max_draws), "--chain-batch", str(args.chain_batch),
                "--mauve-iterations", str(K),
                "--mauve-prompts", str(args.mauve_prompts if K in mauve_Ks else 0), "--mauve-new",
                str(args.mauve_new), *(["--cache-dir", args.cache_dir] if args.cache_dir else []), "--out", str(ev),
                "--no-progress", "--overwrite", log=log)
        r = json.loads((ev / "evaluation.json").read_text())
        if merged is None:
            merged = {**r, "by_iterations": [], "mauve_iterations": []}
        if "bounds" in r.get("judge", {}):
            merged.setdefault("judge", {})["bounds"] = r["judge"]["bounds"]
        merged["by_iterations"] += r["by_iterations"]
        merged["mauve_iterations"] += r["mauve_iterations"]
        if not done:
            print(f"{run.name} K={K}: BPC {r['by_iterations'][0]['bpc']:.4f}", flush=True)
    return merged


def judge_run() -> str:
    """The judge of the samples: "auto", the independent judge of the run's data (`diffusionblocks.judge`: a larger
    plain model trained longer on the training split, cached and built on demand by `evaluate`, never one of the
    compared runs); its held-out BPC is reported beside the judged models'."""
    return "auto"


def _same_judging(r: dict, judged: bool, mauve_Ks: list[int]) -> bool:
    """Whether an earlier evaluation was judged as this invocation asks (a judge or none, MAUVE at the same K's)."""
    return ("judge" in r) == judged and r.get("mauve_iterations") == mauve_Ks


def judge_lines(results: dict) -> list[str]:
    """The report's paragraph on the judge: which, its held-out BPC against every model's at every K (flagged when
    not below all), and MAUVE's table at the K's that have it, with its ceiling and floor (measured once)."""
    judges = {r["judge"]["run"] for r in results.values() if "judge" in r}
    if not judges:
        return ["**No judge**: the runs were evaluated with `--judge none`; no generative perplexity or MAUVE.", ""]
    if len(judges) > 1 or any("judge" not in r for r in results.values()):
        raise SystemExit(f"the runs were evaluated with different judges ({', '.join(sorted(judges))}): rerun them "
                         "with one")
    judge = next(iter(results.values()))["judge"]
    lines = judge_paragraph(judge, [(f"{name} K={row['iterations']}", row["bpc"]) for name, r in results.items()
                                    for row in r["by_iterations"]])
    if not judge.get("bounds"):
        return lines
    return lines + mauve_table(judge["bounds"], [(f"{name}, K={row['iterations']}", row["mauve"])
                                                 for name, r in results.items() for row in r["by_iterations"]
                                                 if "mauve" in row]) + [""]


def plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for name, r in results.items():
        rows = r["by_iterations"]
        K = [row["iterations"] for row in rows]
        axes[0].errorbar(K, [row["bpc"] for row in rows], yerr=[row.get("bpc_se", 0) for row in rows], fmt="o-",
                         capsize=2, label=name)
        axes[1].plot(K, [row.get("gen_ppl", float("nan")) for row in rows], "o-", label=name)
        axes[2].plot(K, [row["distinct_4"] for row in rows], "o-", label=name)
    for ax, label in zip(axes, ("held-out BPC (next-character distribution)",
                                "generative perplexity (independent judge)", "distinct 4-grams")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("core iterations K per token")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, args: argparse.Namespace, costs: dict, results: dict, seconds: float) -> None:
    cfg = load_config(PRESET)
    m = cfg.model
    lines = ["# Recurrent depth: Huginn (recurrence, truncated BPTT) vs DiffusionBlocks (one denoiser, one pass)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}. Command: `python "
             f"benchmarks/recurrent_depth.py --out {args.out} --judge {args.judge} --steps {args.steps} "
             f"--mauve-iterations {args.mauve_iterations} --mauve-prompts {args.mauve_prompts}` "
             f"({seconds / 60:.0f} minutes for what this invocation ran).", "",
             f"Model (presets/shakespeare-recurrent.json): width {m.hidden_size}, {m.num_heads} heads, prelude / core / "
             f"coda {m.prelude} / {m.core} / {m.coda} layers, sequences of {m.seq_len} characters, batch "
             f"{cfg.train.batch_size}, lr {cfg.train.lr}, EMA half-life {cfg.train.ema_halflife_steps} steps. Huginn: "
             f"iterations per step log-normal Poisson, mean {m.mean_recurrence} (+1), backpropagation through the last "
             f"{m.bptt}. The denoiser: one forward pass at a sigma per position, Euler sampler with bridge "
             f"{cfg.sample.bridge}. Evaluation: BPC +- its standard error over windows, on "
             f"{results['huginn']['num_windows']} held-out windows spread evenly over the split (the same for every "
             "model and K), of the distribution the next character is drawn from after K iterations (temperature 1, "
             f"context given): Huginn's softmax averaged over {results['huginn'].get('draws', 1)} initial states; the "
             "denoiser's chain likelihood (`chain_likelihood`: the token draws of the chain enumerated or, between "
             "the first and the last few, drawn with most chains steered to the scored token; its start noise drawn, "
             "a quarter of it steered at a step's reach and half along the scored token's line, weighted back; an "
             "upper bound in expectation, its bias in the table: the delta method's estimate / the fall "
             "from half the draws, about the bias left where it shrinks as 1 / draws); "
             f"{results['huginn']['num_prompts']} held-out prompts continued by {results['huginn']['new_chars']} "
             f"characters (temperature {cfg.sample.temperature}, top-p {cfg.sample.top_p}), scored by the judge "
             "below.", ""]
    if args.findings:
        lines += [Path(args.findings).read_text().strip(), ""]
    lines += ["## Training cost", "",
             "| model | steps | train s (as run) | steps/s (median) | steps / median steps/s | core passes / step | "
             "core passes | peak train MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, c in costs.items():
        lines.append(f"| {name} | {c['steps']} | {c['train_s']:.0f} | {c['steps_per_s']:.2f} | "
                     f"{c['steps'] / c['steps_per_s']:.0f} | {c['core_passes_per_step']:.2f} | {c['core_passes']} | "
                     f"{c['peak_train_mem_mib']:.0f} |")
    lines += ["", "steps/s is the median over the logged intervals (50 steps each), so an interval slowed by other "
              "work on the machine does not move it; equal time is taken at these medians. A core pass of the "
              "denoiser runs on the noisy and the clean stream, twice the tokens of one of Huginn's iterations; "
              "Huginn's backward pass runs through its last iterations only. The peak of the equal-time run is that "
              "of its resumed steps.", "",
              "## Quality against the core's iterations K", "",
              "| K | " + " | ".join(f"{n} BPC | {n} bias (delta / fall) | {n} gen. ppl | {n} distinct-4" for n in results) + " |",
              "|---|" + "---|---|---|---|" * len(results)]
    Ks = [row["iterations"] for row in results["huginn"]["by_iterations"]]
    for i, K in enumerate(Ks):
        cells = []
        for r in results.values():
            row = r["by_iterations"][i]
            se = f" +- {row['bpc_se']:.4f}" if "bpc_se" in row else ""
            ppl = f"{row['gen_ppl']:.2f}" if "gen_ppl" in row else "-"
            bias = f"{row.get('bpc_bias', float('nan')):.4f} / {row.get('bpc_fall', float('nan')):.4f}"
            cells += [f"{row['bpc']:.4f}{se}", bias, ppl,
                      f"{row['distinct_4']:.3f}"]
        lines.append(f"| {K} | " + " | ".join(cells) + " |")
    lines += ["", "gen. ppl: the samples' perplexity per character under the independent judge:", ""]
    lines += judge_lines(results)
    lines += ["![quality against iterations](quality_vs_iterations.png)", "", "## Samples (K = 4 and 64)", ""]
    for name, r in results.items():
        for row in r["by_iterations"]:
            if row["iterations"] in (4, 64):
                lines += [f"{name}, K={row['iterations']}:", "", "```", row["sample"], "```", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
