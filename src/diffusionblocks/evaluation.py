"""Offline evaluation of a trained image generator: conditional accuracy, Frechet distance, KID, chain diagnostics.

Every number comes with the number of samples it used. The Frechet distance of the samples to the
held-out real images is printed next to the same distance between an equally large set of real
training images and the held-out images: the floor that makes the number readable.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, RunConfig
from .data import ImageSplits, load_image_data
from .diagnostics import chain_diagnostics
from .generate import class_labels_evenly, generate
from .latents import LatentSpace, default_cache_dir
from .metrics import frechet_distance, kernel_distance, shares_text
from .reference import accuracy, conditional_accuracy, load_or_train_reference_classifier
from .seeding import make_generator

logger = logging.getLogger(__name__)


@torch.no_grad()
def features(clf, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The reference classifier's penultimate features, N x feature_dim, on the CPU."""
    device = next(clf.parameters()).device
    return torch.cat([clf.features(images[i:i + batch_size].to(device)).cpu()
                      for i in range(0, len(images), batch_size)])


def evaluate_generator(model, cfg: RunConfig, run_dir: str | Path, *, num_samples: int = 1000,
                       steps: int | None = None, sampler: str | None = None, guidance: float | None = None,
                       grid: str | None = None, seed: int = 0, diagnostics: bool = True,
                       device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
                       progress: bool = False, latent: tuple[LatentSpace, ImageSplits] | None = None
                       ) -> tuple[dict[str, Any], torch.Tensor]:
    """Evaluates the class-conditional generator `model` (the run run_dir, loaded); returns (metrics, the generated
    images).

    latent: for a model of latents, the VAE and the run's cached latents: samples are decoded before they are judged,
    and the VAE's reconstruction of the real training images gives a second floor (what a perfect model of the
    latents would score).
    """
    if cfg.model.num_classes == 0:
        raise ConfigError("evaluate needs a class-conditional model (model.num_classes > 0)")
    s = cfg.sample
    steps, sampler = steps or s.steps, sampler or s.sampler
    guidance = s.guidance if guidance is None else guidance
    grid = grid or s.grid
    data = load_image_data(cfg.data, cfg.model.image_size, cfg.model.in_channels)
    clf, clf_meta = load_or_train_reference_classifier(data.train, cache_dir or default_cache_dir(), seed=0,
                                                       device=device, progress=progress)
    m = cfg.model
    labels = class_labels_evenly(num_samples, m.num_classes)
    t0 = time.perf_counter()
    images = generate(model, labels, image_shape=(m.in_channels, m.image_size, m.image_size),
                      num_classes=m.num_classes, steps=steps, sampler=sampler, guidance=guidance, grid=grid,
                      rho=s.rho, seed=seed, device=device, progress=progress,
                      decode=None if latent is None else latent[0].decode)
    sampling_s = time.perf_counter() - t0

    # Real-vs-real floor: as many real training images as samples, against the same held-out set.
    n_real = min(num_samples, len(data.train))
    perm = torch.randperm(len(data.train), generator=make_generator(seed, "eval-real"))[:n_real]
    f_gen, f_test, f_real = (features(clf, x) for x in (images, data.test.images, data.train.images[perm]))
    kid, kid_std = kernel_distance(f_gen, f_test, subset_size=min(1000, len(data.test)), seed=seed)
    kid_floor, _ = kernel_distance(f_real, f_test, subset_size=min(1000, len(data.test)), seed=seed)
    result = {
        "run": str(run_dir), "num_blocks": cfg.blocks.num_blocks, "num_samples": num_samples,
        "num_heldout": len(data.test), "num_real_floor": n_real,
        "sampler": sampler, "steps": steps, "guidance": guidance, "grid": grid, "seed": seed,
        "conditional_accuracy": conditional_accuracy(clf, images, labels),
        "fd": frechet_distance(f_gen, f_test), "fd_real_floor": frechet_distance(f_real, f_test),
        "kid": kid, "kid_std": kid_std, "kid_real_floor": kid_floor,
        "sampling_s": sampling_s, "network_evals_per_sample": steps * (2 if guidance != 1 else 1),
        "layers_per_eval": max(cfg.layer_split()),
        "reference_classifier": {"heldout_accuracy": accuracy(clf, data.test.images, data.test.labels),
                                 "num_heldout": len(data.test), "num_train": len(data.train),
                                 "path": clf_meta.get("path"), "cached": clf_meta.get("cached")},
    }
    if latent is not None:  # the floor of latent diffusion: decode(encode(x)) for the real training images of the floor
        space, latents = latent
        f_vae = features(clf, space.decode(latents.train.images[perm]).clamp(-1, 1))
        result.update({"fd_vae_floor": frechet_distance(f_vae, f_test), "vae": str(space.path),
                       "kid_vae_floor": kernel_distance(f_vae, f_test, subset_size=min(1000, len(data.test)),
                                                        seed=seed)[0]})
    if diagnostics:  # for a latent model, on held-out latents, its estimates decoded for the classifier
        held_out, decode = (data.test, None) if latent is None else (latent[1].test, latent[0].decode)
        result["chain"] = chain_diagnostics(model, held_out, clf, num=min(500, len(data.test)), steps=steps,
                                            sampler=sampler, guidance=guidance, grid=grid, rho=s.rho, seed=seed,
                                            device=device, decode=decode)
    return result, images


def format_evaluation(r: dict[str, Any]) -> str:
    """A few readable lines summarising evaluate_generator's result."""
    lines = [
        f"{r['run']}: B={r['num_blocks']}, {r['sampler']} {r['steps']} steps, guidance {r['guidance']}, "
        f"{r['grid']} grid",
        f"  conditional accuracy {r['conditional_accuracy']:.4f}  ({r['num_samples']} samples)",
        f"  FD {r['fd']:.3f}  (real-vs-real floor {r['fd_real_floor']:.3f}: {r['num_real_floor']} real vs "
        f"{r['num_heldout']} held-out)",
        f"  KID {r['kid']:.5f} +- {r['kid_std']:.5f}  (floor {r['kid_real_floor']:.5f})",
        *([f"  VAE reconstruction floor: FD {r['fd_vae_floor']:.3f}, KID {r['kid_vae_floor']:.5f} (the real images "
           f"encoded and decoded by {r['vae']})"] if "fd_vae_floor" in r else []),
        f"  reference classifier: held-out accuracy {r['reference_classifier']['heldout_accuracy']:.4f} "
        f"on {r['reference_classifier']['num_heldout']} images",
        f"  sampling {r['sampling_s']:.1f} s",
    ]
    for b in r.get("chain", {}).get("per_block", []):
        lines.append(f"  block {b['block']}: oracle accuracy {b['oracle_accuracy']:.3f}, chain {b['chain_accuracy']:.3f}"
                     f" (gap {b['composition_gap']:+.3f}), input shift FD {b['input_shift_fd']:.4f}")
    if "decision" in r.get("chain", {}):
        d = r["chain"]["decision"]
        lines.append(f"  who decides (each block's share of the classifier's error removed from chance, along the chain; "
                     f"on the oracle input; of the information to reveal): {shares_text(d['chain'])}; "
                     f"{shares_text(d['oracle'])}; {shares_text(d['information'])}")
    return "\n".join(lines)
