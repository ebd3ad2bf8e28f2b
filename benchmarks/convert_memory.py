"""Memory of fine-tuning a converted model, over a run: one block of a depth split against the whole end-to-end
network, with and without activation checkpointing and distillation; and a memory limit under which end-to-end
fine-tuning fails and block-wise fine-tuning of the same model succeeds.

    python benchmarks/convert_memory.py --out runs/convert-memory [--steps 8] [--batch 8]

The model is DiT-S/2's size (12 layers of width 384, 6 heads, patch 2) on MNIST (28x28: 196 tokens), converted
from an end-to-end run (B=1, trained --source-steps steps: its weights do not change the memory) into B=3
blocks by depth and by copy. Each configuration is `diffusionblocks train --from ...` in a fresh process for
--steps steps; its peak is train_summary.json's (on the CPU the peak resident set size above the process' size
before training, over the whole run: parameters, gradients, AdamW state, activations, and the teacher when
distilling), next to steps/s.

The limit: RLIMIT_DATA (the process' private writable memory: heap and anonymous mappings, which is what the
CPU allocator's tensors take; not an address-space limit), set in the child before it starts. The script
searches, in --limit-step steps from --limit-start, the lowest limit under which one block's fine-tuning
succeeds, then runs end-to-end fine-tuning under that same limit. Writes OUT/memory.json and OUT/report.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

MODEL = ["--config", "presets/mnist-dit.json", "model.hidden_size=384", "model.depth=12", "model.num_heads=6",
         "model.patch_size=2"]
B = 3


def db(argv: list[str], limit: int | None = None) -> subprocess.CompletedProcess:
    """`diffusionblocks ARGV` in a fresh process, under RLIMIT_DATA=limit bytes when given."""
    def preexec():
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    return subprocess.run([sys.executable, "-m", "diffusionblocks", *argv], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, preexec_fn=preexec)


def fine_tune(start: Path, run: Path, steps: int, extra: list[str], limit: int | None = None) -> dict:
    t0 = time.perf_counter()
    done = db(["train", "--from", str(start), "--out", str(run), "--no-progress", f"train.steps_per_block={steps}",
               "train.log_every=1", "sample.samples_per_class=1", "sample.steps=2", *extra], limit)
    row = {"ok": done.returncode == 0, "process_s": time.perf_counter() - t0}
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        row["error"] = lines[-1][-300:] if lines else f"exit code {done.returncode}"
        return row
    s = json.loads((run / "train_summary.json").read_text())
    mine = [b for b in s["blocks"] if b["block"] in s["trained_now"]]
    t = sum(b["train_time_s"] for b in mine)
    return {**row, "peak_mib": s["peak_train_memory_bytes"] / 2**20, "measure": s["memory_measure"],
            "train_s": t, "steps": sum(b["steps"] for b in mine), "steps_per_s": sum(b["steps"] for b in mine) / t}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--source-steps", type=int, default=2)
    p.add_argument("--limit-start", type=int, default=1024, help="MiB")
    p.add_argument("--limit-step", type=int, default=128, help="MiB")
    p.add_argument("--limit-tries", type=int, default=10)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = out / "source"
    if not (src / "train_summary.json").is_file():
        done = db(["train", *MODEL, "--out", str(src), "--no-progress", "blocks.num_blocks=1",
                   f"train.steps_per_block={args.source_steps}", f"train.batch_size={args.batch}",
                   "sample.samples_per_class=1", "sample.steps=2"])
        assert done.returncode == 0, done.stderr[-2000:]
    for init in ("depth", "copy"):
        if not (out / f"{init}{B}").is_dir():
            done = db(["convert", str(src), "--num-blocks", str(B), "--init", init, "--out", str(out / f"{init}{B}")])
            assert done.returncode == 0, done.stderr[-2000:]
    ckpt = ["train.activation_checkpointing=true"]
    distill = ["train.distill_weight=1"]
    configs = {"end-to-end": (src, []), "end-to-end + ckpt": (src, ckpt),
               "copy, block 0": (out / f"copy{B}", ["--blocks", "0"]),
               "depth, block 0": (out / f"depth{B}", ["--blocks", "0"]),
               "depth, block 0 + ckpt": (out / f"depth{B}", ["--blocks", "0", *ckpt]),
               "depth, block 0 + distillation": (out / f"depth{B}", ["--blocks", "0", *distill]),
               "depth, block 0 + distillation + ckpt": (out / f"depth{B}", ["--blocks", "0", *distill, *ckpt])}
    path = out / "memory.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["machine"] = {"platform": platform.platform(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "steps": args.steps, "batch": args.batch}
    rows = results.setdefault("runs", {})
    for i, (name, (start, extra)) in enumerate(configs.items()):
        if name not in rows:
            rows[name] = fine_tune(start, out / f"run{i}", args.steps, [f"train.batch_size={args.batch}", *extra])
            path.write_text(json.dumps(results, indent=2) + "\n")

    # The limit: the lowest (in --limit-step steps) under which one depth block fine-tunes, then end-to-end under it.
    if "limit" not in results:
        tries = []
        for k in range(args.limit_tries):
            limit = (args.limit_start + k * args.limit_step) * 2**20
            row = fine_tune(out / f"depth{B}", out / f"limit-block-{k}", args.steps,
                            [f"train.batch_size={args.batch}", "--blocks", "0"], limit)
            tries.append({"limit_mib": limit / 2**20, **row})
            if row["ok"]:
                e2e = fine_tune(src, out / "limit-e2e", args.steps, [f"train.batch_size={args.batch}"], limit)
                results["limit"] = {"rlimit_data_mib": limit / 2**20, "block": row, "end_to_end": e2e,
                                    "block_tries": tries}
                break
        else:
            results["limit"] = {"block_tries": tries, "note": "no limit tried let the block fine-tune"}
        path.write_text(json.dumps(results, indent=2) + "\n")
    write_report(out, results)


def write_report(out: Path, r: dict) -> None:
    m = r["machine"]
    e2e = r["runs"]["end-to-end"]["peak_mib"]
    lines = [f"Peak training memory over a run of {m['steps']} steps, batch {m['batch']}, DiT-S/2 size on MNIST "
             f"(cpu_peak_rss_above_start), torch {m['torch']}, {m['threads']} thread(s).", "",
             "| fine-tuning | peak MiB | / end-to-end | train s | steps/s |", "|---|---|---|---|---|"]
    for name, row in r["runs"].items():
        if row["ok"]:
            lines.append(f"| {name} | {row['peak_mib']:.0f} | {row['peak_mib'] / e2e:.2f} | {row['train_s']:.1f} | "
                         f"{row['steps_per_s']:.2f} |")
        else:
            lines.append(f"| {name} | failed: {row['error']} | | | |")
    lim = r.get("limit", {})
    if "rlimit_data_mib" in lim:
        b, e = lim["block"], lim["end_to_end"]
        lines += ["", f"Under RLIMIT_DATA = {lim['rlimit_data_mib']:.0f} MiB: one depth block's fine-tuning "
                  f"{'succeeds' if b['ok'] else 'fails'} (peak {b.get('peak_mib', float('nan')):.0f} MiB above start); "
                  f"end-to-end fine-tuning of the same model {'succeeds' if e['ok'] else 'fails'}"
                  + (f" (peak {e['peak_mib']:.0f} MiB)" if e["ok"] else f": `{e['error']}`") + "."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
