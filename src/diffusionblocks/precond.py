"""EDM preconditioning and the L2 denoising loss (method.md section 1; Karras et al. 2022, Table 1)."""

from __future__ import annotations

import torch
from torch import nn


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """x with trailing size-1 axes up to target_dims, so a per-sample (N,) tensor broadcasts over (N, ...)."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def get_scalings(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM's preconditioning, per sample."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def denoised(z: torch.Tensor, F_x: torch.Tensor, c_skip: torch.Tensor, c_out: torch.Tensor) -> torch.Tensor:
    """D = c_skip z + c_out F (method.md section 1), in float32 whatever F's dtype."""
    return c_skip * z + c_out * F_x.float()


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2, so that lambda * c_out^2 = 1."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


class Denoiser(nn.Module):
    """D(z, sigma | x) = c_skip z + c_out F(c_in z, c_noise | x), for a raw network F.

    One block of a DiffusionBlocks model is one Denoiser; it advertises the noise range it was
    trained for as `sigma_min` / `sigma_max`. Inputs and outputs are float32; F runs in its own dtype.
    """

    def __init__(self, inner_model: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 80.0):
        super().__init__()
        self.inner_model = inner_model
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def forward(self, z: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        z, sigma = z.float(), sigma.float()
        c_skip, c_out, c_in, c_noise = (append_dims(c, z.ndim) for c in get_scalings(sigma, self.sigma_data))
        F_x = self.inner_model(c_in * z, c_noise.flatten(), **cond)
        return denoised(z, F_x, c_skip, c_out)

    def loss(self, y: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, D_teacher: torch.Tensor | None = None,
             distill_weight: float = 0.0, **cond) -> torch.Tensor:
        """Per-sample lambda(sigma) |D(y + sigma eps) - y|^2 / dim, computed as |F - (y - c_skip z) / c_out|^2.

        D_teacher: a teacher's denoised output at the same z and sigma; adds distill_weight * lambda |D - D_teacher|^2
        (method.md section 8), computed in the same form.
        """
        y, sigma = y.float(), sigma.float()
        z = y + append_dims(sigma, y.ndim) * noise
        c_skip, c_out, c_in, c_noise = (append_dims(c, y.ndim) for c in get_scalings(sigma, self.sigma_data))
        F_x = self.inner_model(c_in * z, c_noise.flatten(), **cond)
        target = (y - c_skip * z) / c_out
        loss = (F_x.float() - target).pow(2).flatten(1).mean(1)  # (N,)
        if D_teacher is None:
            return loss
        target_teacher = (D_teacher.float() - c_skip * z) / c_out
        return loss + distill_weight * (F_x.float() - target_teacher).pow(2).flatten(1).mean(1)  # (N,)
