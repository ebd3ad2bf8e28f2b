"""Latent diffusion, measured: the tiny VAE's round trip on held-out digits, and the training memory of a latent
DiT-S/2 at 256x256 input resolution against pixel space.

    python benchmarks/make_vae.py --out runs/vae-digits        # first: the trained tiny VAE
    python benchmarks/latent.py --vae runs/vae-digits --out benchmarks/results/latent

Round trip: the 297 held-out digits encoded (posterior mean, and one seeded posterior sample) and decoded by the
trained tiny VAE and by a random one of the same shape (benchmarks/make_vae.py's tiny_vae, seed 0): MSE on the
[-1, 1] scale, PSNR = 10 log10(2^2 / MSE) (peak-to-peak 2), and the reference classifier's accuracy on the
reconstructions (on the originals for comparison).

Memory: `bench memory`'s measuring child (`diffusionblocks bench memory --child`, one fresh process per
configuration, CPU allocator peak: the bytes PyTorch's CPU allocator holds above the start, the CPU counterpart of
CUDA's max_memory_allocated), two training steps per block (the second is the steady state, AdamW's state resident
while the activations are), end-to-end (B=1) and B=4 sequential with the inactive
blocks offloaded; DiT-S/2 (hidden 384, 12 layers, 6 heads, patch 2) on random data of the latent shape 32x32x4 (the
latents of 256x256 images by an SD-shaped AutoencoderKL, built randomly here and run once to check the shape), and of
pixel shape at the resolutions the CPU can step in time (--pixel-sizes), extrapolated to 256x256 by token count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from make_vae import tiny_vae

from diffusionblocks.data import DataConfig, load_image_data
from diffusionblocks.evaluation import default_cache_dir
from diffusionblocks.latents import LatentSpace, load_vae
from diffusionblocks.membench import MemCase, model_config
from diffusionblocks.reference import accuracy, load_or_train_reference_classifier
from diffusionblocks.seeding import make_generator

MIB = 2 ** 20


def round_trip(space: LatentSpace, images: torch.Tensor, sample: bool) -> torch.Tensor:
    """decode(encode(images)), with the posterior mean or one seeded posterior draw."""
    noise = None
    if sample:
        h = space.latent_size(images.shape[-1])
        noise = torch.randn((len(images), space.latent_channels, h, h), generator=make_generator(0, "bench-sample"))
    return space.decode(space.encode(images, noise)).clamp(-1, 1)


def measure_round_trip(vae_dir: str) -> list[dict]:
    data = load_image_data(DataConfig())
    x = data.test.images
    clf, _ = load_or_train_reference_classifier(data.train, default_cache_dir())
    spaces = {"trained (" + vae_dir + ")": load_vae(vae_dir),
              "random (same shape, seed 0)": LatentSpace(tiny_vae(seed=0), Path("random"), "")}
    rows = []
    for name, space in spaces.items():
        z_train = space.encode(data.train.images)
        for sample in (False, True):
            t0 = time.perf_counter()
            x_hat = round_trip(space, x, sample)
            seconds = time.perf_counter() - t0
            mse = float((x_hat - x).pow(2).mean())
            rows.append({"vae": name, "latent": "sample" if sample else "mean", "num_heldout": len(x),
                         "mse": mse, "psnr_db": 10 * math.log10(4.0 / mse),
                         "classifier_accuracy": accuracy(clf, x_hat, data.test.labels),
                         "classifier_accuracy_originals": accuracy(clf, x, data.test.labels),
                         "latent_shape": list(z_train.shape[1:]), "train_latent_mean": float(z_train.mean()),
                         "train_latent_std": float(z_train.std()), "round_trip_s": seconds,
                         "images_per_s": len(x) / seconds})
    return rows


def sd_shaped_latent_shape(size: int = 256) -> dict:
    """The latent shape of a size x size RGB image under a randomly built AutoencoderKL of Stable Diffusion's shape."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=size).eval()
    x = torch.rand((1, 3, size, size), generator=make_generator(0, "sd-vae")) * 2 - 1
    t0 = time.perf_counter()
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    return {"vae_params": sum(p.numel() for p in vae.parameters()), "latent_shape": list(z.shape[1:]),
            "encode_one_image_s": time.perf_counter() - t0}


def measure_case(image_size: int, channels: int, batch: int, case: MemCase, steps: int, timeout_s: float) -> dict:
    """One configuration in `bench memory`'s fresh measuring process; {"timed_out": True} after timeout_s."""
    cfg = model_config("dit-s2", image_size, channels, batch)
    spec = {"case": {"mode": case.mode, "num_blocks": case.num_blocks, "checkpointing": case.checkpointing},
            "config": cfg.to_dict(), "random_images": True, "steps": steps, "device": "cpu", "cpu_measure": "allocated",
            "threads": 1}
    cmd = [sys.executable, "-m", "diffusionblocks", "bench", "memory", "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"image_size": image_size, "channels": channels, "batch": batch, "case": case.name,
                "timed_out": True, "timeout_s": timeout_s}
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    step = r["step_s_median_per_block"]
    return {"image_size": image_size, "channels": channels, "batch": batch, "case": case.name,
            "tokens_per_image": (image_size // 2) ** 2, "peak_mib": r["peak_bytes"] / MIB, "measure": r["measure"],
            "analytic_mib": {k: v / MIB for k, v in r["analytic"].items()}, "step_s_per_block": step,
            "steps_per_s_per_block": [1 / s for s in step], "process_s": time.perf_counter() - t0}


def extrapolate(rows: list[dict], case: str, tokens: int) -> dict | None:
    """Peak memory at `tokens` per image: the activations' part (peak minus params, grads and AdamW) is linear in the
    token count (attention is memory-efficient: no T x T matrix is kept), fitted through the two largest measured
    pixel resolutions."""
    pts = sorted((r for r in rows if r["case"] == case and "peak_mib" in r and r["channels"] == 3),
                 key=lambda r: r["tokens_per_image"])[-2:]
    if len(pts) < 2:
        return None
    fixed = lambda r: sum(v for k, v in r["analytic_mib"].items() if k != "activations")  # noqa: E731
    (t1, a1), (t2, a2) = ((r["tokens_per_image"], r["peak_mib"] - fixed(r)) for r in pts)
    slope = (a2 - a1) / (t2 - t1)
    return {"case": case, "tokens_per_image": tokens, "from_tokens": [t1, t2],
            "activation_mib_per_token": slope, "peak_mib": fixed(pts[-1]) + a2 + slope * (tokens - t2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", default="runs/vae-digits", help="the trained tiny VAE (benchmarks/make_vae.py)")
    p.add_argument("--out", default=None, help="directory for results.json")
    p.add_argument("--pixel-sizes", default="64,128", help="pixel resolutions measured (256 when the CPU can)")
    p.add_argument("--batches", default="1,4", help="batch sizes of the latent runs")
    p.add_argument("--pixel-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="training steps per block: the first creates AdamW's state "
                   "after its backward pass, so only from the second on does the state share the peak with the "
                   "activations")
    p.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    p.add_argument("--skip-round-trip", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    results: dict = {"machine": f"{os.cpu_count()}-core CPU, torch {torch.__version__}, 1 thread"}
    if not a.skip_round_trip:
        results["round_trip"] = measure_round_trip(a.vae)
        for r in results["round_trip"]:
            print(f"{r['vae']:<34} {r['latent']:<6} MSE {r['mse']:.5f}  PSNR {r['psnr_db']:.2f} dB  classifier "
                  f"{r['classifier_accuracy']:.3f} (originals {r['classifier_accuracy_originals']:.3f})  latent std "
                  f"{r['train_latent_std']:.3f}  {r['images_per_s']:.0f} images/s", flush=True)
    if not a.skip_memory:
        results["sd_vae"] = sd_shaped_latent_shape()
        c, h = results["sd_vae"]["latent_shape"][0], results["sd_vae"]["latent_shape"][1]
        print(f"SD-shaped VAE ({results['sd_vae']['vae_params'] / 1e6:.1f} M params): 256x256x3 -> {h}x{h}x{c}, "
              f"encoding one image {results['sd_vae']['encode_one_image_s']:.1f} s", flush=True)
        cases = [MemCase("e2e", 1), MemCase("sequential", 4)]
        shapes = [(h, c, int(b)) for b in a.batches.split(",")]
        shapes += [(int(s), 3, a.pixel_batch) for s in a.pixel_sizes.split(",")]
        rows = []
        for size, channels, batch in shapes:
            for case in cases:
                r = measure_case(size, channels, batch, case, a.steps, a.timeout)
                rows.append(r)
                if r.get("timed_out"):
                    print(f"{size}x{size}x{channels} batch {batch} {case.name}: timed out after {a.timeout:.0f} s")
                    continue
                print(f"{size}x{size}x{channels} batch {batch} {case.name}: peak {r['peak_mib']:.0f} MiB, step "
                      f"{statistics.median(r['step_s_per_block']):.2f} s per block "
                      f"({statistics.median(r['steps_per_s_per_block']):.3f} steps/s)", flush=True)
        results["memory"] = rows
        results["pixel_256_extrapolated"] = [e for e in (extrapolate(rows, case.name, 128 ** 2) for case in cases) if e]
        for e in results["pixel_256_extrapolated"]:
            print(f"256x256x3 batch {a.pixel_batch} {e['case']} (extrapolated from {e['from_tokens']} tokens): "
                  f"{e['peak_mib']:.0f} MiB", flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
