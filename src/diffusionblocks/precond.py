"""A block's parameterization: how its network is wrapped into the denoiser D(z, sigma) the samplers and the router
call, and its training loss.

`Denoiser`: EDM preconditioning and the L2 denoising loss (method.md section 1; Karras et al. 2022, Table 1), the
default. `FlowDenoiser` and `VPEpsDenoiser`: a network trained as rectified flow (SD3, Flux) or DDPM (DiT) keeps its
own input, time and target (velocity, epsilon) and loss, with no preconditioning around it; only the conversion to
the VE noise level sigma is added, so that blocks of any parameterization chain and sample alike.
"""

from __future__ import annotations

import torch
from torch import nn

from .noise import VPTimestep


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


def first_channels(out: torch.Tensor, channels: int) -> torch.Tensor:
    """A network's prediction (N, C, ...) in float32: the first C of 2C output channels when the network also
    predicts a variance (DiT's learned sigma), else all of it."""
    return (out[:, :channels] if out.shape[1] == 2 * channels else out).float()


class FlowDenoiser(nn.Module):
    """A rectified-flow velocity network v(x_t, t | x) as a VE denoiser (SD3, Esser et al. 2024, Eq. 3):
    t = sigma / (1 + sigma), x_t = (1 - t) z, D(z, sigma) = x_t - t v.

    x_t = (1 - t) y + t eps and v = eps - y give x_t - t v = y. The network is called as
    `inner_model(x_t, t * timestep_scale, **cond)` (diffusers' flow-matching timesteps: t * 1000).
    """

    def __init__(self, inner_model: nn.Module, timestep_scale: float = 1000.0, sigma_min: float = 0.002,
                 sigma_max: float = 80.0):
        super().__init__()
        self.inner_model = inner_model
        self.timestep_scale = timestep_scale
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """v(x_t, t) (N, C, ...) in float32, for t (N,)."""
        return first_channels(self.inner_model(x_t, t * self.timestep_scale, **cond), x_t.shape[1])

    def forward(self, z: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        z, sigma = z.float(), sigma.float()
        t = append_dims(sigma / (1 + sigma), z.ndim)
        x_t = (1 - t) * z
        return x_t - t * self.velocity(x_t, t.flatten(), **cond)

    def loss(self, y: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, D_teacher: torch.Tensor | None = None,
             distill_weight: float = 0.0, **cond) -> torch.Tensor:
        """Per-sample |v(x_t, t) - (eps - y)|^2 / dim at x_t = (1 - t) y + t eps, t = sigma / (1 + sigma): the
        conditional flow-matching loss (SD3, Eq. 3), unweighted.

        D_teacher: a teacher's D(y + sigma eps, sigma); adds distill_weight |v - v_teacher|^2 / dim with
        v_teacher = (x_t - D_teacher) / t, the velocity that denoises to it.
        """
        y, sigma = y.float(), sigma.float()
        t = append_dims(sigma / (1 + sigma), y.ndim)
        x_t = (1 - t) * y + t * noise
        v = self.velocity(x_t, t.flatten(), **cond)
        loss = (v - (noise - y)).pow(2).flatten(1).mean(1)  # (N,)
        if D_teacher is None:
            return loss
        v_teacher = (x_t - D_teacher.float()) / t
        return loss + distill_weight * (v - v_teacher).pow(2).flatten(1).mean(1)  # (N,)


class VPEpsDenoiser(nn.Module):
    """A DDPM noise-prediction network eps(x_t, t | x) as a VE denoiser (Ho et al. 2020; Karras et al. 2022,
    Table 1, VP): alpha_bar = 1 / (1 + sigma^2), x_t = sqrt(alpha_bar) z, D(z, sigma) = z - sigma eps.

    The network is called as `inner_model(x_t, t, **cond)` with t the continuous timestep of sigma under
    `schedule` (`noise.VPTimestep.time`); of 2C output channels (a learned variance) the first C are eps.
    """

    def __init__(self, inner_model: nn.Module, schedule: VPTimestep, sigma_min: float = 0.002,
                 sigma_max: float = 80.0):
        super().__init__()
        self.inner_model = inner_model
        self.schedule = schedule
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def epsilon(self, x_t: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        """eps(x_t, t(sigma)) (N, C, ...) in float32, for sigma (N,)."""
        t = self.schedule.time(sigma).to(sigma.dtype)
        return first_channels(self.inner_model(x_t, t, **cond), x_t.shape[1])

    def forward(self, z: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        z, sigma = z.float(), sigma.float()
        s = append_dims(sigma, z.ndim)
        x_t = z / (1 + s ** 2).sqrt()
        return z - s * self.epsilon(x_t, sigma, **cond)

    def loss(self, y: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, D_teacher: torch.Tensor | None = None,
             distill_weight: float = 0.0, **cond) -> torch.Tensor:
        """Per-sample |eps(x_t, t) - eps|^2 / dim at x_t = sqrt(alpha_bar) y + sqrt(1 - alpha_bar) eps, DDPM's
        simple loss (Ho et al. 2020, Eq. 14).

        D_teacher: a teacher's D(z, sigma) at z = y + sigma eps; adds distill_weight |eps - eps_teacher|^2 / dim with
        eps_teacher = (z - D_teacher) / sigma.
        """
        y, sigma = y.float(), sigma.float()
        s = append_dims(sigma, y.ndim)
        sqrt_ab = 1 / (1 + s ** 2).sqrt()
        x_t = sqrt_ab * y + s * sqrt_ab * noise  # sqrt(1 - alpha_bar) = sigma sqrt(alpha_bar)
        eps = self.epsilon(x_t, sigma, **cond)
        loss = (eps - noise).pow(2).flatten(1).mean(1)  # (N,)
        if D_teacher is None:
            return loss
        eps_teacher = (y + s * noise - D_teacher.float()) / s
        return loss + distill_weight * (eps - eps_teacher).pow(2).flatten(1).mean(1)  # (N,)
