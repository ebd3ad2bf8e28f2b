"""The image-folder and Hugging Face paths on MNIST written out as PNG files: the same tensors as the built-in
loader, the same quality after the same training, and a loader that is not the bottleneck.

    OMP_NUM_THREADS=1 python benchmarks/image_folder.py --out runs/image-folder [--steps 200] [--num 500]
    python benchmarks/image_folder.py --write-only      # only write data/mnist-png and data/mnist-hf

1. Writes MNIST's 10,000 test images (read by the built-in loader from ../shared/data/mnist) as lossless PNGs,
   data/mnist-png/<label>/<index>.png, and the same images as a Hugging Face dataset (Image and ClassLabel
   features, save_to_disk) in data/mnist-hf (data/ is git-ignored; nothing is rewritten when it is there).
2. Parity: the folder loader's images and labels against MNIST's put in the folder's order (class by class, then by
   index): max |delta| and label mismatches; after the split (the same fixed permutation rule, holdout 2,000) the
   training set against MNIST's images at the same positions of that order.
3. Throughput: images/s decoded at startup (folder and hf), and per batch of 128 read by random row index from the
   memory-mapped Hugging Face dataset (the cost of decoding per batch), against training images/s.
4. Quality: presets/mnist-dit.json and presets/mnist-folder-dit.json trained --steps per block each (one thread,
   fresh processes), and evaluated by the same judge: samples of both against MNIST's held-out 2,000 images with
   MNIST's reference classifier (conditional accuracy, FD), and the last training losses.
Writes OUT/results.json and prints the figures.

    OMP_NUM_THREADS=1 python benchmarks/image_folder.py --digits --out runs/image-folder-digits [--steps 800]

--digits instead compares at a real budget on scikit-learn's 8x8 digits: writes them as PNGs in class subfolders,
data/digits-png/<label>/<index>.png (pixels round((x + 1) * 127.5) of the built-in loader's x in [-1, 1]; the
round trip checked), then trains presets/digits-dit.json --steps per block (its 800 by default) with
data.dataset=digits and with data.dataset=folder data.root=data/digits-png data.holdout=297 (both train on
1,500; same seed, fresh processes, one after the other), and runs `diffusionblocks evaluate` on each: conditional
accuracy, FD and KID against each run's own held-out set (the folder's is other images: the same split rule
applied to the folder's order).
Writes OUT/digits.json and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

from diffusionblocks.data import DataConfig, _load_digits, _mnist_files, _mnist_pair, _split_fixed, load_image_data
from diffusionblocks.evaluation import default_cache_dir, evaluate_generator
from diffusionblocks.hf_datasets import read_images
from diffusionblocks.image_folder import read_image_folder
from diffusionblocks.pretrained import from_pretrained
from diffusionblocks.tasks import load_config

MNIST = "../shared/data/mnist"
PNG, HF = Path("data/mnist-png"), Path("data/mnist-hf")
PRESETS = {"mnist": "presets/mnist-dit.json", "folder": "presets/mnist-folder-dit.json"}
DIGITS_PNG, DIGITS_PRESET = Path("data/digits-png"), "presets/digits-dit.json"
DIGITS_RUNS = {"digits": ["data.dataset=digits"], "folder": ["data.dataset=folder", f"data.root={DIGITS_PNG}",
                                                                  "data.holdout=297"]}  # digits' 1,500 / 297


def mnist_uint8() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 t10k images (uint8 N x 28 x 28) and labels, in file order, through the built-in loader's reader."""
    names = ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    images, labels = _mnist_pair(_mnist_files(Path(MNIST), names, False), "t10k")
    return ((images[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy(), labels.numpy()


def write_png_folder(dest, images: np.ndarray, labels: np.ndarray, digits: int) -> float:
    """Grey uint8 images as dest/<label>/<index>.png (written beside it, then renamed into place); the seconds."""
    t0 = time.perf_counter()
    tmp = dest.with_name(dest.name + ".tmp")
    for k in range(10):
        (tmp / str(k)).mkdir(parents=True, exist_ok=True)
    for i, (x, y) in enumerate(zip(images, labels)):
        Image.fromarray(x, "L").save(tmp / str(y) / f"{i:0{digits}d}.png")
    tmp.rename(dest)
    return time.perf_counter() - t0


def write_data(images: np.ndarray, labels: np.ndarray) -> dict:
    """data/mnist-png and data/mnist-hf, unless there; returns the seconds each took."""
    out = {}
    if not PNG.is_dir():
        out["write_png_s"] = write_png_folder(PNG, images, labels, digits=5)
    if not HF.is_dir():
        t0 = time.perf_counter()
        features = datasets.Features({"image": datasets.Image(),
                                      "label": datasets.ClassLabel(names=[str(k) for k in range(10)])})
        order = np.argsort(labels, kind="stable")  # the folder's order: class by class, then by index
        ds = datasets.Dataset.from_dict({"image": [Image.fromarray(images[i], "L") for i in order],
                                         "label": labels[order].tolist()}, features=features)
        datasets.DatasetDict({"train": ds}).save_to_disk(str(HF))
        out["write_hf_s"] = time.perf_counter() - t0
    return out


def parity(images: np.ndarray, labels: np.ndarray) -> dict:
    """The folder loader against MNIST in the folder's order, before and after the split."""
    order = np.argsort(labels, kind="stable")
    t0 = time.perf_counter()
    got, got_labels, classes = read_image_folder(PNG, 28, 1, 8.0)
    decode_s = time.perf_counter() - t0
    delta = int(np.abs(got[:, 0].astype(np.int16) - images[order].astype(np.int16)).max())
    splits = load_image_data(DataConfig(dataset="folder", root=str(PNG), holdout=2000), 28, 1)
    t0 = time.perf_counter()
    load_image_data(DataConfig(dataset="mnist", root=MNIST, split="test", holdout=2000))
    mnist_s = time.perf_counter() - t0
    reference = _split_fixed(torch.from_numpy(images[order]).float().div(127.5).sub(1)[:, None],
                             torch.from_numpy(labels[order]), 2000, 10, "mnist")
    return {"classes": list(classes), "num_images": len(got), "max_abs_delta_uint8": delta,
            "label_mismatches": int((got_labels != labels[order]).sum()),
            "split_train_max_abs_delta": float((splits.train.images - reference.train.images).abs().max()),
            "split_test_max_abs_delta": float((splits.test.images - reference.test.images).abs().max()),
            "split_labels_equal": bool(torch.equal(splits.train.labels, reference.train.labels)
                                       and torch.equal(splits.test.labels, reference.test.labels)),
            "folder_decode_s": decode_s, "folder_decode_images_per_s": len(got) / decode_s,
            "mnist_idx_load_s": mnist_s}


def hf_throughput(repeats: int = 20, batch: int = 128) -> dict:
    """Startup decode of the whole HF dataset, and per-batch random-access reads (median over repeats)."""
    t0 = time.perf_counter()
    data = load_image_data(DataConfig(dataset="hf", root=str(HF), holdout=2000), 28, 1)
    startup_s = time.perf_counter() - t0
    ds = datasets.load_from_disk(str(HF))["train"]
    classes = tuple(ds.features["label"].names)
    times = []
    for r in range(repeats):
        idx = np.random.default_rng(r).integers(0, len(ds), batch)
        t0 = time.perf_counter()
        read_images(ds, idx, "image", "label", classes, 28, 1, "mnist-hf")
        times.append(time.perf_counter() - t0)
    per_batch = statistics.median(times)
    return {"startup_s": startup_s, "startup_images_per_s": (len(data.train) + len(data.test)) / startup_s,
            "batch": batch, "per_batch_s_median": per_batch, "per_batch_images_per_s": batch / per_batch}


def train_and_judge(out: Path, steps: int, num: int) -> dict:
    """Both presets trained `steps` per block in fresh processes; samples judged against MNIST's held-out set."""
    results = {}
    mnist_cfg = load_config(PRESETS["mnist"])
    for name, preset in PRESETS.items():
        run = out / name
        summary = run / "train_summary.json"
        if not summary.is_file():
            subprocess.run([sys.executable, "-m", "diffusionblocks", "train", "--config", preset, "--out", str(run),
                            "--no-progress", f"train.steps_per_block={steps}", "train.checkpoint_every=100000",
                            "sample.samples_per_class=2"], check=True, stdout=subprocess.DEVNULL)
        s = json.loads(summary.read_text())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = {b: [r["loss"] for r in rows if r["block"] == b][-1] for b in range(3)}
        model, cfg = from_pretrained(run)
        t0 = time.perf_counter()
        r, _ = evaluate_generator(model, mnist_cfg, run, num_samples=num, diagnostics=False,
                                  cache_dir=default_cache_dir())
        results[name] = {"steps_per_block": steps, "train_summary": s, "last_loss_per_block": last,
                         "conditional_accuracy": r["conditional_accuracy"], "fd": r["fd"],
                         "fd_real_floor": r["fd_real_floor"], "kid": r["kid"], "num_samples": num,
                         "evaluate_s": time.perf_counter() - t0}
    return results


def steps_per_s(summary: dict) -> float:
    """Median over blocks of the steps/s the run's train_summary.json records."""
    return statistics.median(b["steps_per_s"] for b in summary["blocks"])


def digits_uint8() -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """The 1,797 digits as uint8 N x 8 x 8 (round((x + 1) * 127.5) of the built-in loader's x), labels, and x."""
    splits = _load_digits(DataConfig(dataset="digits", holdout=1))  # every image: train in scikit-learn's order + 1
    x = torch.cat([splits.train.images, splits.test.images])
    y = torch.cat([splits.train.labels, splits.test.labels])
    return ((x[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy(), y.numpy(), x


def write_digits(images: np.ndarray, labels: np.ndarray) -> float | None:
    """data/digits-png/<label>/<index>.png, unless there; the seconds it took."""
    return None if DIGITS_PNG.is_dir() else write_png_folder(DIGITS_PNG, images, labels, digits=4)


def digits_round_trip(images: np.ndarray, labels: np.ndarray, x: torch.Tensor) -> dict:
    """The PNGs read back (uint8, and scaled to [-1, 1] as the folder loader does) against what was written and
    against the built-in loader's values."""
    order = np.argsort(labels, kind="stable")
    got, got_labels, classes = read_image_folder(DIGITS_PNG, 8, 1, 8.0)
    unit = torch.from_numpy(got[:, 0]).float().div(127.5).sub(1)
    return {"num_images": len(got), "classes": list(classes),
            "label_mismatches": int((got_labels != labels[order]).sum()),
            "uint8_max_abs_delta": int(np.abs(got[:, 0].astype(np.int16) - images[order].astype(np.int16)).max()),
            "unit_max_abs_delta_vs_builtin": float((unit - x[order][:, 0]).abs().max()),
            "builtin_distinct_values": sorted({round(v, 6) for v in x.unique().tolist()})}


def digits_train_and_evaluate(out: Path, steps: int, num: int) -> dict:
    """digits-dit trained on the built-in digits and on the PNG folder (fresh processes), then evaluated by the CLI."""
    results = {}
    for name, overrides in DIGITS_RUNS.items():
        run = out / name
        cmd = [sys.executable, "-m", "diffusionblocks", "train", "--config", DIGITS_PRESET, "--out", str(run),
               "--no-progress", *overrides, f"train.steps_per_block={steps}", "train.checkpoint_every=100000"]
        t0 = time.perf_counter()
        if not (run / "train_summary.json").is_file():
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        train_wall = time.perf_counter() - t0
        evaluation = run / f"eval-num{num}"
        ev = [sys.executable, "-m", "diffusionblocks", "evaluate", str(run), "--num", str(num),
              "--out", str(evaluation), "--no-progress"]
        t0 = time.perf_counter()
        if not (evaluation / "evaluation.json").is_file():
            subprocess.run(ev, check=True, stdout=subprocess.DEVNULL)
        s = json.loads((run / "train_summary.json").read_text())
        e = json.loads((evaluation / "evaluation.json").read_text())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        B = len(s["blocks"])
        results[name] = {"commands": [" ".join(["diffusionblocks", *cmd[3:]]), " ".join(["diffusionblocks", *ev[3:]])],
                         "steps_per_block": steps, "train_wall_s": train_wall, "evaluate_wall_s":
                         time.perf_counter() - t0, "train_summary": s,
                         "last_loss_per_block": {b: [r["loss"] for r in rows if r["block"] == b][-1] for b in range(B)},
                         "train_steps_per_s_median": steps_per_s(s), "evaluation": e}
        print(f"{name}: {results[name]['train_steps_per_s_median']:.2f} steps/s per block (median), train "
              f"{train_wall:.0f} s, " + json.dumps({k: e.get(k) for k in ("conditional_accuracy", "fd",
                                                                          "fd_real_floor", "kid")}), flush=True)
    return results


def main_digits(out: Path, steps: int, num: int) -> None:
    images, labels, x = digits_uint8()
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch "
                         f"{torch.__version__}, {torch.get_num_threads()} thread", "write_png_s":
              write_digits(images, labels), "round_trip": digits_round_trip(images, labels, x)}
    print(json.dumps(result["round_trip"]), flush=True)
    result["training"] = digits_train_and_evaluate(out, steps, num)
    (out / "digits.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/image-folder")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per block of each run (default 200; with --digits the preset's 800)")
    ap.add_argument("--num", type=int, default=None, help="samples judged per run (default 500; --digits 1000)")
    ap.add_argument("--write-only", action="store_true", help="only write data/mnist-png and data/mnist-hf")
    ap.add_argument("--digits", action="store_true", help="the digits comparison at the preset's budget instead")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.digits:
        out = Path(args.out if args.out != "runs/image-folder" else "runs/image-folder-digits")
        out.mkdir(parents=True, exist_ok=True)
        main_digits(out, args.steps or load_config(DIGITS_PRESET).train.steps_per_block, args.num or 1000)
        return
    args.steps, args.num = args.steps or 200, args.num or 500
    images, labels = mnist_uint8()
    written = write_data(images, labels)
    print(json.dumps(written))
    if args.write_only:
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} thread", "written": written, "parity": parity(images, labels)}
    print(json.dumps(result["parity"], indent=1))
    result["hf"] = hf_throughput()
    print(json.dumps(result["hf"], indent=1))
    result["training"] = train_and_judge(out, args.steps, args.num)
    for name, r in result["training"].items():
        sps = steps_per_s(r["train_summary"])
        r["train_steps_per_s_median"] = sps
        r["train_images_per_s"] = sps * load_config(PRESETS[name]).train.batch_size
        print(f"{name}: {sps:.2f} steps/s per block ({r['train_images_per_s']:.0f} images/s), last losses "
              f"{[round(v, 4) for v in r['last_loss_per_block'].values()]}, cond. acc. {r['conditional_accuracy']:.3f},"
              f" FD {r['fd']:.3f} (floor {r['fd_real_floor']:.3f})")
    (out / "results.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
