"""The main job, measured: DiffusionBlocks (B=3) against end-to-end (B=1) at equal training compute on digits.

Trains both with `diffusionblocks train` (B=1 gets the same steps as each block, so both run the same
number of layer evaluations), samples 50 images of each class from each, and scores the samples with
an independent CNN trained on the real training digits. Prints the wall time of each job, the steps/s
of each block, and the conditional accuracy (the fraction of samples the classifier assigns to the
requested class).

    python benchmarks/digits_main_job.py [--out DIR] [--per-class 50] [--skip-train] [section.field=value ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffusionblocks.data import DataConfig, load_image_data
from diffusionblocks.generate import class_labels_evenly, generate
from diffusionblocks.plotting import save_image_grid
from diffusionblocks.pretrained import from_pretrained
from diffusionblocks.reference import accuracy, conditional_accuracy, load_or_train_reference_classifier


def train_job(run: Path, overrides: list[str]) -> float:
    """Runs `diffusionblocks train` in a fresh process; returns its wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffusionblocks", "train", "--out", str(run), "--no-progress", *overrides],
                   check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides applied to both runs")
    parser.add_argument("--out", default="runs/bench-digits-main-job", help="directory for both runs and the report")
    parser.add_argument("--per-class", type=int, default=50, help="samples per class (10 classes)")
    parser.add_argument("--skip-train", action="store_true", help="evaluate existing runs in --out")
    args = parser.parse_args()

    out = Path(args.out)
    runs = {"B=3 (DiffusionBlocks)": (out / "b3", list(args.overrides)),
            "B=1 (end-to-end)": (out / "b1", [*args.overrides, "blocks.num_blocks=1"])}
    wall = {}
    if not args.skip_train:
        out.mkdir(parents=True, exist_ok=True)
        for name, (run, ov) in runs.items():
            wall[name] = train_job(run, ov)

    data = load_image_data(DataConfig())
    clf, meta = load_or_train_reference_classifier(data.train, out / "cache", seed=0)
    clf_acc = accuracy(clf, data.test.images, data.test.labels)
    labels = class_labels_evenly(10 * args.per_class, 10)
    report = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "classifier_heldout_accuracy": clf_acc, "num_samples": len(labels), "runs": {}}
    real_acc = conditional_accuracy(clf, data.train.images, data.train.labels)
    for name, (run, _) in runs.items():
        model, cfg = from_pretrained(run)
        s = cfg.sample
        t0 = time.perf_counter()
        images = generate(model, labels, image_shape=(1, 8, 8), num_classes=10, steps=s.steps, sampler=s.sampler,
                          guidance=s.guidance, grid=s.grid, seed=1)
        sample_s = time.perf_counter() - t0
        save_image_grid(images[:: args.per_class // 10 or 1][: 100], run / "bench_samples.png", nrow=10)
        summary = json.loads((run / "train_summary.json").read_text())
        report["runs"][name] = {
            "conditional_accuracy": conditional_accuracy(clf, images, labels),
            "train_wall_s": wall.get(name, summary.get("wall_time_s")),
            "steps_per_s": [round(b["steps_per_s"], 2) for b in summary["blocks"]],
            "steps_per_block": summary["blocks"][0]["steps"],
            "sampling_s": sample_s,
        }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    print(f"machine: {report['machine']}")
    print(f"reference CNN: held-out accuracy {clf_acc:.4f} on {len(data.test)} real digits "
          f"(real training digits: {real_acc:.4f})")
    print(f"{'run':<22} {'cond. acc.':>10} {'train wall s':>13} {'steps/block':>12} {'steps/s per block':>22} "
          f"{'sample s':>9}")
    for name, r in report["runs"].items():
        print(f"{name:<22} {r['conditional_accuracy']:>10.4f} {r['train_wall_s']:>13.1f} {r['steps_per_block']:>12d} "
              f"{str(r['steps_per_s']):>22} {r['sampling_s']:>9.1f}")
    print(f"({len(labels)} class-conditional samples per run, {args.per_class} per class)")


if __name__ == "__main__":
    main()
