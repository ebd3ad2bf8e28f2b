"""The noise axis and the block of a run's parameterization (`noise.parameterization`): EDM's, rectified flow's or
DDPM's, each a `NoiseAxis` in the VE noise level sigma (noise.py) and a denoiser D(z, sigma) with its own loss
(precond.py), so partitions, grids, samplers and the router take any of them unchanged.
"""

from __future__ import annotations

from torch import nn

from .config import NoiseConfig
from .noise import FlowTime, LogNormalSigma, NoiseAxis, VPTimestep
from .precond import Denoiser, FlowDenoiser, VPEpsDenoiser


def parameterization(noise: NoiseConfig) -> str:
    """The parameterization of a noise section ("edm" for one without the field)."""
    return getattr(noise, "parameterization", "edm")


def noise_axis(noise: NoiseConfig) -> NoiseAxis:
    """The axis the blocks partition: equal mass of the density the model trains with, pushed forward to sigma."""
    kind = parameterization(noise)
    if kind == "flow":
        return FlowTime(density=noise.time_density, m=noise.logit_mean, s=noise.logit_std, shift=noise.shift,
                        sigma_min=noise.sigma_min, sigma_max=noise.sigma_max)
    if kind == "vp-eps":
        return vp_schedule(noise)
    return LogNormalSigma(P_mean=noise.P_mean, P_std=noise.P_std, sigma_min=noise.sigma_min, sigma_max=noise.sigma_max)


def vp_schedule(noise: NoiseConfig) -> VPTimestep:
    return VPTimestep(num_timesteps=noise.num_timesteps, beta_start=noise.beta_start, beta_end=noise.beta_end)


def denoiser(noise: NoiseConfig, inner_model: nn.Module, sigma_min: float, sigma_max: float) -> nn.Module:
    """A block: `inner_model`, called as inner_model(x, time, **cond), wrapped as the parameterization's denoiser,
    advertising its training range [sigma_min, sigma_max]."""
    kind = parameterization(noise)
    if kind == "flow":
        return FlowDenoiser(inner_model, timestep_scale=noise.timestep_scale, sigma_min=sigma_min, sigma_max=sigma_max)
    if kind == "vp-eps":
        return VPEpsDenoiser(inner_model, vp_schedule(noise), sigma_min=sigma_min, sigma_max=sigma_max)
    return Denoiser(inner_model, sigma_data=noise.sigma_data, sigma_min=sigma_min, sigma_max=sigma_max)
