"""Samplers: plain functions over a denoiser callable and a sigma grid (k-diffusion's calling convention).

`model(x, sigma, **extra_args)` returns the denoised x; `sigma` is a tensor of shape [batch].
`sigmas` is descending and ends in 0 (see `noise.get_sigmas_quantile`, `noise.get_sigmas_karras`).
With a `BlockwiseDenoiser` as the model, each evaluation runs only the block that owns its sigma.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import trange

from .precond import append_dims


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Converts a denoiser output to a Karras ODE derivative, dx/dsigma = (x - D(x, sigma)) / sigma."""
    return (x - denoised) / append_dims(sigma, x.ndim)


@torch.no_grad()
def sample_euler(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn; method.md section 4)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable, leave=False):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i] * s_in, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        # Euler step.
        x = x + (sigmas[i + 1] - sigmas[i]) * d
    return x


@torch.no_grad()
def sample_heun(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
    """Heun's 2nd-order method, EDM's deterministic sampler (Karras et al. 2022, Algorithm 1); Euler on the last step."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable, leave=False):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i] * s_in, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            # Euler step.
            x = x + d * dt
        else:
            # Apply 2nd order correction: evaluated by the block that owns sigma_{i+1}.
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = to_d(x_2, sigmas[i + 1] * s_in, denoised_2)
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                    callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), in the half-log-SNR variable t = -ln sigma."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable, leave=False):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
            h = t_next - t
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = (t - (-sigmas[i - 1].log())) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * denoised_d
        old_denoised = denoised
    return x


SAMPLERS: dict[str, Callable] = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}


class CFGDenoiser:
    """Classifier-free guidance around a class-conditional denoiser: D_uncond + w (D_cond - D_uncond).

    Args:
        model: denoiser called as model(x, sigma, class_labels=labels).
        guidance: w; 1 returns the conditional denoiser, 0 the unconditional one.
        null_class: the label index that stands for "no class" (dropped labels in training).
    """

    def __init__(self, model: Callable, guidance: float, null_class: int):
        self.model = model
        self.guidance = guidance
        self.null_class = null_class

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        if self.guidance == 1:
            return self.model(x, sigma, class_labels=class_labels)
        null = torch.full_like(class_labels, self.null_class)
        # One batched call: (2N, ...) = [conditional; unconditional].
        D = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=torch.cat([class_labels, null]))
        D_cond, D_uncond = D.chunk(2)
        return D_uncond + self.guidance * (D_cond - D_uncond)
