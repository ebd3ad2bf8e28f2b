"""Class-conditional image generation from a trained model: noise, sigma grid, guidance and sampler together."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .noise import sigma_grid
from .sampling import SAMPLERS, CFGDenoiser
from .seeding import make_generator


def initial_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """One standard normal draw per sample seed, so a sample does not depend on its batch (EDM's per-seed generators)."""
    return torch.stack([torch.randn(shape, generator=make_generator(s, "sample")) for s in seeds])


def class_labels_evenly(num: int, num_classes: int) -> torch.Tensor:
    """num labels covering the classes evenly, in contiguous runs: 0,0,..,1,1,..,(num_classes-1)."""
    return torch.arange(num) * num_classes // num


@torch.no_grad()
def generate(model, labels: torch.Tensor, *, image_shape: tuple[int, ...], num_classes: int, steps: int = 50,
             sampler: str = "euler", guidance: float = 2.0, grid: str = "quantile", rho: float = 7.0, seed: int = 0,
             batch_size: int = 500, device: str | torch.device = "cpu", progress: bool = False,
             callback: Callable[[dict], None] | None = None,
             decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Samples images for `labels` from `model` (a BlockwiseDenoiser); returns float32 N x C x H x W in [-1, 1].

    Sample i starts from the noise of seed (seed, i), whatever the batch size. callback: called after each
    step of each batch with the sampler's dict (x, i, sigma, denoised...) and "batch_start", the batch's first index.
    decode: maps each batch of samples (of image_shape, a latent) to pixel images (latents.LatentSpace.decode).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
    axis = model.partition.axis
    sigmas = sigma_grid(axis, steps, grid, rho).to(device, torch.float32)
    D = CFGDenoiser(model, guidance, null_class=num_classes) if num_classes > 0 else model
    out = []
    for start in range(0, len(labels), batch_size):
        idx = list(range(start, min(start + batch_size, len(labels))))
        x = initial_noise(image_shape, [seed * 1_000_003 + i for i in idx]).to(device) * sigmas[0]
        extra = {"class_labels": labels[idx].to(device)} if num_classes > 0 else {}
        step_callback = None if callback is None else lambda d, start=start: callback({**d, "batch_start": start})
        x = SAMPLERS[sampler](D, x, sigmas, extra_args=extra, callback=step_callback, disable=not progress)
        if decode is not None:
            x = decode(x)
        out.append(x.clamp(-1, 1).float().cpu())
    return torch.cat(out)
