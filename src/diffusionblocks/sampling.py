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
    """The probability-flow ODE's slope at (x, sigma) given the denoised estimate: dx/dsigma = (x - D) / sigma."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """x moved along the slope (x - D) / sigma from noise level sigma to sigma_next (scalars; method.md section 4);
    to sigma_next = 0 it lands on D. The product comes before the quotient: the label and token chains' order."""
    return x + (sigma_next - sigma) * (x - denoised) / sigma


def _denoised_at(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, i: int, s_in: torch.Tensor, extra_args: dict,
                 callback: Callable | None) -> torch.Tensor:
    """D(x, sigma_i) of step i, handed to the callback as k-diffusion's samplers do."""
    denoised = model(x, sigmas[i] * s_in, **extra_args)
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
    return denoised


@torch.no_grad()
def sample_euler(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn; method.md section 4)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable, leave=False):
        denoised = _denoised_at(model, x, sigmas, i, s_in, extra_args, callback)
        x = euler_step(x, denoised, sigmas[i], sigmas[i + 1])
    return x


@torch.no_grad()
def sample_heun(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
    """Heun's 2nd-order method, EDM's deterministic sampler (Karras et al. 2022, Algorithm 1); Euler on the last step."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable, leave=False):
        denoised = _denoised_at(model, x, sigmas, i, s_in, extra_args, callback)
        d = to_d(x, sigmas[i] * s_in, denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            # No slope exists at sigma = 0: the final step is Euler's.
            x = euler_step(x, denoised, sigmas[i], sigmas[i + 1])
        else:
            # Trapezoidal rule: a trial first-order step, the slope again where it lands (from the block
            # that owns sigma_{i+1}), then the step taken with the mean of the two slopes.
            x_trial = x + d * dt
            d_trial = to_d(x_trial, sigmas[i + 1] * s_in, model(x_trial, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_trial) / 2 * dt
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                    callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), with lambda = -ln sigma as the time variable.

    Each step is exact for a denoised estimate that is linear in lambda; the estimate is extrapolated
    linearly from this step's and the previous step's (the first step uses this step's alone).
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    D_prev = None
    for i in trange(len(sigmas) - 1, disable=disable, leave=False):
        D_i = _denoised_at(model, x, sigmas, i, s_in, extra_args, callback)
        if sigmas[i + 1] == 0:
            x = D_i
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()  # lambda_{i+1} - lambda_i > 0
            D_lin = D_i
            if D_prev is not None:
                r = (sigmas[i - 1].log() - sigmas[i].log()) / h  # previous step's length over this one's
                D_lin = (1 + 1 / (2 * r)) * D_i - (1 / (2 * r)) * D_prev
            # x_{i+1} = (sigma_{i+1} / sigma_i) x_i + (1 - e^{-h}) D
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * D_lin
        D_prev = D_i
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
