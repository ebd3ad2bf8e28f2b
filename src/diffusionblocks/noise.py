"""Noise levels, their training density, the partition into blocks, and inference grids.

method.md sections 1, 2 and 4. The partition is built as "equal mass under the training density
of the noise axis", so the same code partitions EDM's sigma (log-normal density), the masking time t of
masked diffusion (density -alpha'(t)), and the time of a model trained with its own parameterization
(rectified flow's t, DDPM's timesteps) read as a VE noise level sigma; only the `NoiseAxis` differs.
All schedule arithmetic is done in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch
from sklearn.isotonic import IsotonicRegression

from .config import PARTITIONS

_f64 = torch.float64


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=_f64)


def Phi(x: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF."""
    return torch.special.ndtr(x)


def Phi_inv(u: torch.Tensor) -> torch.Tensor:
    """Inverse of the standard normal CDF."""
    return torch.special.ndtri(u)


class NoiseAxis(Protocol):
    """A noise axis with a training density on [lo, hi]: high values are noisier and belong to block 0."""

    lo: float
    hi: float

    def cdf(self, s: torch.Tensor) -> torch.Tensor:
        """Untruncated CDF of the training density (float64)."""
        ...

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        """Inverse of `cdf` (float64)."""
        ...

    def warp(self, s: torch.Tensor) -> torch.Tensor:
        """The axis' natural coordinate, in which the "uniform" partition and the overlap are linear."""
        ...

    def unwarp(self, w: torch.Tensor) -> torch.Tensor:
        """Inverse of `warp`."""
        ...


@dataclass(frozen=True)
class LogNormalSigma:
    """EDM's training density of sigma: ln sigma ~ N(P_mean, P_std^2), truncated to [sigma_min, sigma_max]."""

    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    @property
    def lo(self) -> float:
        return self.sigma_min

    @property
    def hi(self) -> float:
        return self.sigma_max

    def cdf(self, s: torch.Tensor) -> torch.Tensor:
        """q(s) = Phi((ln s - P_mean) / P_std)   (method.md section 2)."""
        return Phi((torch.as_tensor(s, dtype=_f64).log() - self.P_mean) / self.P_std)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        """s = exp(P_mean + P_std * Phi^-1(u))."""
        return (self.P_mean + self.P_std * Phi_inv(torch.as_tensor(u, dtype=_f64))).exp()

    def warp(self, s: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(s, dtype=_f64).log()

    def unwarp(self, w: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(w, dtype=_f64).exp()


@dataclass(frozen=True)
class MaskingTime:
    """The time t of absorbing-state masked diffusion (method.md section 5): each token is masked with
    probability 1 - alpha(t), t in [0, 1], t = 1 all masked.

    The ELBO integrand has density -alpha'(t) over t, so "equal training mass" is equal decrements of
    alpha: the CDF of the training density is 1 - alpha(t) (linear alpha: t itself, boundaries b/B).
    schedule: "linear", alpha(t) = 1 - t; or "cosine", alpha(t) = 1 - cos(pi/2 (1 - t)) (MD4).
    """

    schedule: str = "linear"

    lo = 0.0
    hi = 1.0

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """The probability that a token is still unmasked at time t."""
        t = torch.as_tensor(t, dtype=_f64)
        return 1 - t if self.schedule == "linear" else 1 - torch.cos(torch.pi / 2 * (1 - t))

    def density(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t), the training density of t (it integrates to 1 over [0, 1])."""
        t = torch.as_tensor(t, dtype=_f64)
        return torch.ones_like(t) if self.schedule == "linear" else torch.pi / 2 * torch.sin(torch.pi / 2 * (1 - t))

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        """1 - alpha(t)."""
        return 1 - self.alpha(t)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        u = torch.as_tensor(u, dtype=_f64)
        return u if self.schedule == "linear" else 1 - 2 / torch.pi * torch.arccos(u)

    def warp(self, t: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(t, dtype=_f64)

    def unwarp(self, w: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(w, dtype=_f64)


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """The piecewise-linear function through the points (xp, fp), xp ascending, held constant beyond its ends
    (numpy.interp), in float64 on x's device."""
    x = torch.as_tensor(x, dtype=_f64)
    xp, fp = xp.to(x.device, _f64), fp.to(x.device, _f64)
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)  # xp[i - 1] <= x <= xp[i] inside
    w = ((x - xp[i - 1]) / (xp[i] - xp[i - 1])).clamp(0, 1)
    return fp[i - 1] + w * (fp[i] - fp[i - 1])


@dataclass(frozen=True)
class FlowTime:
    """Rectified flow's time t (SD3, Esser et al. 2024, Eq. 3), read as a VE noise level: x_t = (1 - t) y + t eps
    is z = x_t / (1 - t) = y + sigma eps with sigma = t / (1 - t).

    The training density of t is SD3's: u ~ logit-normal(m, s) (logit(u) ~ N(m, s^2), their Eq. 19) or uniform,
    then the timestep shift t = shift u / (1 + (shift - 1) u) (their Eq. 23; shift = 1: none). The axis spans
    sigma in [sigma_min, sigma_max], t in [sigma_min / (1 + sigma_min), sigma_max / (1 + sigma_max)]; its natural
    coordinate (`warp`) is t, so boundaries and overlaps read in the model's own time.
    """

    time_name: ClassVar[str] = "t"  # The model's own time, as `status` names it beside sigma.

    density: str = "logit-normal"
    m: float = 0.0
    s: float = 1.0
    shift: float = 1.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    @property
    def lo(self) -> float:
        return self.sigma_min

    @property
    def hi(self) -> float:
        return self.sigma_max

    def time(self, sigma: torch.Tensor) -> torch.Tensor:
        """t = sigma / (1 + sigma)."""
        sigma = torch.as_tensor(sigma, dtype=_f64)
        return sigma / (1 + sigma)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma = t / (1 - t)."""
        t = torch.as_tensor(t, dtype=_f64)
        return t / (1 - t)

    def shifted(self, u: torch.Tensor) -> torch.Tensor:
        """t = shift u / (1 + (shift - 1) u)."""
        return self.shift * u / (1 + (self.shift - 1) * u)

    def unshifted(self, t: torch.Tensor) -> torch.Tensor:
        """u = t / (shift - (shift - 1) t), the inverse of `shifted`."""
        return t / (self.shift - (self.shift - 1) * t)

    def cdf(self, s: torch.Tensor) -> torch.Tensor:
        """P(sigma' <= s) = P(u <= unshifted(t(s))): Phi((logit u - m) / s) for logit-normal u, u for uniform."""
        u = self.unshifted(self.time(s))
        return Phi((torch.logit(u) - self.m) / self.s) if self.density == "logit-normal" else u

    def icdf(self, q: torch.Tensor) -> torch.Tensor:
        """sigma(shifted(u)) with u = sigmoid(m + s Phi^-1(q)) (logit-normal) or q (uniform)."""
        q = torch.as_tensor(q, dtype=_f64)
        u = torch.sigmoid(self.m + self.s * Phi_inv(q)) if self.density == "logit-normal" else q
        return self.sigma(self.shifted(u))

    def warp(self, s: torch.Tensor) -> torch.Tensor:
        return self.time(s)

    def unwarp(self, w: torch.Tensor) -> torch.Tensor:
        """sigma(t) of t held to [0, 1] (an overlap widened beyond the axis' time reaches sigma = 0 or infinity)."""
        return self.sigma(torch.as_tensor(w, dtype=_f64).clamp(0, 1))


@dataclass(frozen=True)
class VPTimestep:
    """DDPM's timesteps k = 0..T-1 (Ho et al. 2020), read as VE noise levels: betas linear from beta_start to
    beta_end, alpha_bar_k = prod_{i <= k} (1 - beta_i), x_k = sqrt(alpha_bar_k) y + sqrt(1 - alpha_bar_k) eps is
    z = x_k / sqrt(alpha_bar_k) = y + sigma_k eps with sigma_k = sqrt((1 - alpha_bar_k) / alpha_bar_k) (Karras et
    al. 2022, Table 1, VP).

    Between timesteps the time is continuous, ln sigma linear in it (k-diffusion's discrete schedules). The
    training density is uniform over the timesteps, taken continuous: cdf(sigma) = t(sigma) / (T - 1). The
    axis spans [sigma_0, sigma_{T-1}]; its natural coordinate (`warp`) is the timestep t.
    """

    time_name: ClassVar[str] = "timestep"

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_k, k = 0..T-1."""
        betas = torch.linspace(self.beta_start, self.beta_end, self.num_timesteps, dtype=_f64)
        return torch.cumprod(1 - betas, 0)

    def log_sigmas(self) -> torch.Tensor:
        """ln sigma_k = ln sqrt((1 - alpha_bar_k) / alpha_bar_k), ascending in k."""
        ab = self.alphas_cumprod()
        return 0.5 * ((1 - ab) / ab).log()

    @property
    def lo(self) -> float:
        return float(self.log_sigmas()[0].exp())

    @property
    def hi(self) -> float:
        return float(self.log_sigmas()[-1].exp())

    def time(self, sigma: torch.Tensor) -> torch.Tensor:
        """The continuous timestep of sigma: ln sigma interpolated between the ln sigma_k."""
        ln_sigma = torch.as_tensor(sigma, dtype=_f64).log()
        return interp(ln_sigma, self.log_sigmas(), torch.arange(self.num_timesteps, dtype=_f64))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The noise level of continuous timestep t, the inverse of `time`."""
        t = torch.as_tensor(t, dtype=_f64)
        return interp(t, torch.arange(self.num_timesteps, dtype=_f64), self.log_sigmas()).exp()

    def cdf(self, s: torch.Tensor) -> torch.Tensor:
        """t(s) / (T - 1): the uniform density over the timesteps."""
        return self.time(s) / (self.num_timesteps - 1)

    def icdf(self, q: torch.Tensor) -> torch.Tensor:
        return self.sigma(torch.as_tensor(q, dtype=_f64) * (self.num_timesteps - 1))

    def warp(self, s: torch.Tensor) -> torch.Tensor:
        return self.time(s)

    def unwarp(self, w: torch.Tensor) -> torch.Tensor:
        return self.sigma(w)


def sample_truncated(axis: NoiseAxis, n: int, lo: float, hi: float, *, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu", stratified: bool = False) -> torch.Tensor:
    """Draws n values from the axis' training density truncated to [lo, hi] by inverse CDF (method.md section 3, step 2).

    stratified: one draw in each of n equal-mass strata, (i + v) / n for a single v ~ U(0, 1) (the
    low-discrepancy sampler of Kingma et al. 2021), which lowers the variance of a batch's loss.
    """
    q_lo, q_hi = axis.cdf(_t(lo)), axis.cdf(_t(hi))
    u = _uniforms(n, generator, stratified)
    s = axis.icdf(q_lo + (q_hi - q_lo) * u).clamp(lo, hi)
    return s.to(device)


def _uniforms(n: int, generator: torch.Generator | None, stratified: bool) -> torch.Tensor:
    """n draws of U(0, 1), float64, made where the generator is; stratified: (i + v) / n for one v."""
    at = generator.device if generator is not None else torch.device("cpu")
    if stratified:
        return (torch.arange(n, dtype=_f64, device=at) + torch.rand(1, generator=generator, dtype=_f64, device=at)) / n
    return torch.rand(n, generator=generator, dtype=_f64, device=at)


# The fitted training density's share spread evenly over the axis' coordinate: where the curve is flat a block still
# sees some training levels (CDCD's warping alone would give them none).
DENSITY_FLOOR = 0.1


def _knots_over(axis: NoiseAxis, w: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The knots of a piecewise-linear curve over [lo, hi]: the coordinates warp(lo), the knots w (ascending) strictly
    inside, warp(hi); and which of w are inside."""
    w_lo, w_hi = axis.warp(_t(lo)), axis.warp(_t(hi))
    inside = (w > w_lo) & (w < w_hi)
    return torch.cat([w_lo[None], w[inside], w_hi[None]]), inside


def fitted_cdf(axis: NoiseAxis, curve: tuple[tuple[float, float], ...], w: torch.Tensor) -> torch.Tensor:
    """F(w) = (1 - f) (R(w) - R(lo)) / (R(hi) - R(lo)) + f (w - w_lo) / (w_hi - w_lo), f = DENSITY_FLOOR: the
    cumulative training density of a curve R of what remains undecided, given as (level, R) knots, over the axis'
    coordinate w (CDCD's time warping, Dieleman et al. 2022: levels drawn by the inverse of the fitted curve)."""
    levels, R = torch.tensor(curve, dtype=_f64).unbind(1)
    knots = axis.warp(levels)
    ends = torch.stack([axis.warp(_t(axis.lo)), axis.warp(_t(axis.hi))])
    R_lo, R_hi = interp(ends, knots, R).unbind()
    if not float(R_hi - R_lo) > 0:
        raise ValueError("the fitted curve is flat over the axis: it gives no density")
    return (1 - DENSITY_FLOOR) * (interp(w, knots, R) - R_lo) / (R_hi - R_lo) \
        + DENSITY_FLOOR * (w - ends[0]) / (ends[1] - ends[0])


def sample_fitted(axis: NoiseAxis, curve: tuple[tuple[float, float], ...], n: int, lo: float, hi: float, *,
                  generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                  stratified: bool = False) -> torch.Tensor:
    """Draws n levels in [lo, hi] from the density of `fitted_cdf`, truncated: each stretch of the axis as likely as
    the share of the curve it holds (plus the floor), inverted exactly (F is linear between the curve's knots)."""
    w, _ = _knots_over(axis, axis.warp(torch.tensor([c[0] for c in curve], dtype=_f64)), lo, hi)  # F's knots
    F = fitted_cdf(axis, curve, w)  # strictly increasing: the floor's slope is positive
    u = _uniforms(n, generator, stratified).to(w.device)
    s = axis.unwarp(interp(F[0] + (F[-1] - F[0]) * u, F, w)).clamp(lo, hi)
    return s.to(device)


@dataclass(frozen=True)
class Partition:
    """The noise axis cut into B contiguous ranges; block 0 owns the highest range (method.md section 2).

    Args:
        axis: the noise axis and its training density.
        num_blocks: B.
        kind: "equiprobable" (equal training mass per block, the default), "uniform" (equal width in
            the axis' natural coordinate, e.g. ln sigma: the paper's ablation) or "balanced" (the inner
            boundaries given by `fitted`: equal shares of a measured curve, `balanced_boundaries`).
        gamma: overlap; each block's training range is widened by gamma of its width in that coordinate.
        fitted: "balanced" only: the B - 1 inner boundaries, ascending, inside (axis.lo, axis.hi).
        curve: where given, each block draws its training levels from this fitted curve's density (`sample_fitted`,
            (level, R) knots) instead of the axis' training density.
    """

    axis: NoiseAxis
    num_blocks: int
    kind: str = "equiprobable"
    gamma: float = 0.05
    fitted: tuple[float, ...] | None = None
    curve: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {self.num_blocks}")
        if self.kind not in PARTITIONS:
            raise ValueError(f"unknown partition kind {self.kind!r}")
        if (self.kind == "balanced") != (self.fitted is not None):
            raise ValueError("a 'balanced' partition is given its fitted inner boundaries, and no other kind is")
        if self.fitted is not None:
            s = [self.axis.lo, *self.fitted, self.axis.hi]
            if len(self.fitted) != self.num_blocks - 1 or any(a >= b for a, b in zip(s, s[1:])):
                raise ValueError(f"the fitted boundaries {list(self.fitted)} are not {self.num_blocks - 1} ascending "
                                 f"levels inside ({self.axis.lo}, {self.axis.hi})")

    @property
    def boundaries(self) -> torch.Tensor:
        """s_0 < s_1 < ... < s_B, ascending, float64, with s_0 = lo and s_B = hi exactly."""
        a, B = self.axis, self.num_blocks
        k = torch.arange(B + 1, dtype=_f64)
        if self.kind == "balanced":
            return torch.tensor([a.lo, *self.fitted, a.hi], dtype=_f64)
        if self.kind == "equiprobable":
            # s_k = exp(P_mean + P_std * Phi^-1(q_min + (q_max - q_min) * k / B))
            q_min, q_max = a.cdf(_t(a.lo)), a.cdf(_t(a.hi))
            s = a.icdf(q_min + (q_max - q_min) * k / B)
        else:
            w_min, w_max = a.warp(_t(a.lo)), a.warp(_t(a.hi))
            s = a.unwarp(w_min + (w_max - w_min) * k / B)
        s[0], s[-1] = a.lo, a.hi
        return s

    def block_range(self, b: int) -> tuple[float, float]:
        """[lo, hi] owned by block b at inference; block 0 has the highest noise."""
        self._check_block(b)
        s = self.boundaries
        k = self.num_blocks - 1 - b
        return float(s[k]), float(s[k + 1])

    def training_range(self, b: int) -> tuple[float, float]:
        """Block b's range widened by the overlap gamma: [lo (hi/lo)^-gamma, hi (hi/lo)^gamma], clipped."""
        a = self.axis
        lo, hi = self.block_range(b)
        w_lo, w_hi = a.warp(_t(lo)), a.warp(_t(hi))
        width = w_hi - w_lo
        new_lo = float(a.unwarp(w_lo - self.gamma * width))
        new_hi = float(a.unwarp(w_hi + self.gamma * width))
        return max(new_lo, a.lo), min(new_hi, a.hi)

    def owner(self, s: torch.Tensor) -> torch.Tensor:
        """Index of the block owning each noise level (values beyond the axis go to the end blocks).

        A level exactly on an inner boundary belongs to the noisier block.
        """
        s = torch.as_tensor(s)
        inner = self.boundaries[1:-1].to(s.device)
        j = torch.searchsorted(inner, s.to(_f64).contiguous(), right=True)  # 0 = lowest range
        return self.num_blocks - 1 - j

    def sample(self, b: int, n: int, *, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", stratified: bool = False) -> torch.Tensor:
        """Training noise levels for block b: the training density (or the fitted curve's) truncated to its widened
        range."""
        lo, hi = self.training_range(b)
        if self.curve is not None:
            return sample_fitted(self.axis, self.curve, n, lo, hi, generator=generator, device=device,
                                 stratified=stratified)
        return sample_truncated(self.axis, n, lo, hi, generator=generator, device=device, stratified=stratified)

    def _check_block(self, b: int) -> None:
        if not 0 <= b < self.num_blocks:
            raise IndexError(f"block {b} out of range for {self.num_blocks} blocks")


@dataclass(frozen=True)
class RemainingCurve:
    """What is still undecided at each noise level, fitted non-decreasing toward more noise over the axis' coordinate
    w = warp(s) (ln sigma, or t): for discrete targets the held-out cross-entropy at s (the bits still undecided),
    for continuous ones the information still to be revealed, I(snr) = 1/2 int_snr^inf mmse (method.md section 8).
    The fit is isotonic regression (the closest non-decreasing curve in weighted least squares), linear between the
    measured levels and constant beyond them."""

    w: torch.Tensor  # (n,) the measured levels' coordinates, ascending, float64
    R: torch.Tensor  # (n,) the fitted curve there, non-decreasing

    @classmethod
    def fit(cls, axis: NoiseAxis, levels: torch.Tensor, remaining: torch.Tensor,
            weights: torch.Tensor | None = None) -> RemainingCurve:
        """The fitted curve of measurements `remaining` (n,) at noise levels `levels` (n,), optionally weighted."""
        w = axis.warp(torch.as_tensor(levels, dtype=_f64)).cpu().numpy()
        y = torch.as_tensor(remaining, dtype=_f64).cpu().numpy()
        if w.shape != y.shape or w.ndim != 1 or len(w) < 2 or not (np.isfinite(w).all() and np.isfinite(y).all()):
            raise ValueError("a remaining curve needs at least two finite (level, value) pairs of the same length")
        sw = None if weights is None else torch.as_tensor(weights, dtype=_f64).cpu().numpy()
        order = np.argsort(w, kind="stable")
        R = IsotonicRegression(increasing=True).fit_transform(w[order], y[order],
                                                              sample_weight=None if sw is None else sw[order])
        w_u, first = np.unique(w[order], return_index=True)  # repeated levels share one fitted value
        return cls(torch.from_numpy(w_u), torch.from_numpy(R[first]))

    def __call__(self, s: torch.Tensor, axis: NoiseAxis) -> torch.Tensor:
        """R at noise levels s."""
        return interp(axis.warp(torch.as_tensor(s, dtype=_f64)), self.w, self.R)

    def shares(self, partition: Partition) -> list[float]:
        """The share of the decision each block's range removes, block 0 (the noisiest) first; they add up to 1."""
        R = self(partition.boundaries, partition.axis)  # at s_0 < ... < s_B
        total = float(R[-1] - R[0])
        if total <= 0:
            raise ValueError("the fitted curve is flat over the axis: nothing is decided anywhere")
        return [float(R[k + 1] - R[k]) / total for k in reversed(range(partition.num_blocks))]


def balanced_boundaries(axis: NoiseAxis, curve: RemainingCurve, num_blocks: int) -> tuple[float, ...]:
    """The inner boundaries s_1 < ... < s_{B-1} at equal shares of the curve: R(s_k) = R(lo) + k / B (R(hi) - R(lo)),
    inverted linearly between the measured levels (a step in R puts a boundary inside the step)."""
    ends = curve(torch.tensor([axis.lo, axis.hi], dtype=_f64), axis)
    if float(ends[1] - ends[0]) <= 0:
        raise ValueError("the fitted curve is flat over the axis: nothing to balance")
    w, inside = _knots_over(axis, curve.w, axis.lo, axis.hi)
    R = torch.cat([ends[:1], curve.R[inside], ends[1:]])
    out = []
    for k in range(1, num_blocks):
        y = ends[0] + k / num_blocks * (ends[1] - ends[0])
        j = int(torch.searchsorted(R, y))  # the first knot with R >= y, so R[j - 1] < y <= R[j]
        wk = w[j - 1] + (y - R[j - 1]) / (R[j] - R[j - 1]) * (w[j] - w[j - 1])
        out.append(float(axis.unwarp(wk)))
    return tuple(out)


def append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_quantile(axis: NoiseAxis, n: int) -> torch.Tensor:
    """n noise levels at equally spaced quantiles of the training density, descending, then 0 (method.md section 4)."""
    q_min, q_max = axis.cdf(_t(axis.lo)), axis.cdf(_t(axis.hi))
    if n == 1:
        return append_zero(torch.tensor([axis.hi], dtype=_f64))
    u = q_max - (q_max - q_min) * torch.arange(n, dtype=_f64) / (n - 1)
    s = axis.icdf(u)
    s[0], s[-1] = axis.hi, axis.lo
    return append_zero(s)


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The noise schedule of Karras et al. (2022), Eq. 5, descending, then 0."""
    ramp = torch.linspace(0, 1, n, dtype=_f64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def _quantile_grid(axis: NoiseAxis, n: int, rho: float) -> torch.Tensor:
    return get_sigmas_quantile(axis, n)


def _karras_grid(axis: NoiseAxis, n: int, rho: float) -> torch.Tensor:
    return get_sigmas_karras(n, axis.lo, axis.hi, rho)


# The inference grids by name: grid(axis, steps, rho) -> descending noise levels, then 0.
GRIDS: dict[str, Callable[[NoiseAxis, int, float], torch.Tensor]] = {"quantile": _quantile_grid, "karras": _karras_grid}


def get_sigmas_blocks(partition: Partition, n: int) -> torch.Tensor:
    """n levels, n / B inside each block's range, descending, then 0 (issue 28): each block its own steps, evenly
    spaced in the axis' coordinate at the middles of n / B equal stretches of its range, except that the chain
    starts at the top of the axis. No step falls on an inner boundary (which belongs to the noisier block) nor at the
    lowest level, where a block returns its input."""
    B, a = partition.num_blocks, partition.axis
    if n < 1 or n % B:
        raise ValueError(f"the per-block grid gives each of the {B} blocks as many steps: {n} steps are not a "
                         f"multiple of {B}")
    k = n // B
    mid = (torch.arange(k, dtype=_f64) + 0.5) / k  # (k,): fractions of a block's width below its top
    levels = []
    for b in range(B):
        w_lo, w_hi = (a.warp(_t(v)) for v in partition.block_range(b))
        levels.append(a.unwarp(w_hi - mid * (w_hi - w_lo)))
    s = torch.cat(levels)
    s[0] = a.hi
    return append_zero(s)


# A grid that needs the partition, not only the axis: each block's steps inside its own range.
BLOCK_GRID = "blocks"
GRID_NAMES = (*GRIDS, BLOCK_GRID)


def sigma_grid(axis: NoiseAxis, steps: int, grid: str = "quantile", rho: float = 7.0,
               partition: Partition | None = None) -> torch.Tensor:
    """The inference grid named `grid` (GRID_NAMES): descending noise levels ending in 0 (method.md section 4);
    "blocks" is the partition's (`get_sigmas_blocks`)."""
    if grid == BLOCK_GRID:
        if partition is None or partition.axis != axis:
            raise ValueError("the per-block grid needs the partition of the axis")
        return get_sigmas_blocks(partition, steps)
    if grid not in GRIDS:
        raise ValueError(f"unknown sigma grid {grid!r} (known: {', '.join(GRID_NAMES)})")
    return GRIDS[grid](axis, steps, rho)


def steps_per_block(partition: Partition, sigmas: torch.Tensor) -> list[int]:
    """How many denoising steps of the grid (its last 0 excluded) each block runs."""
    owners = partition.owner(sigmas[:-1])
    return [int((owners == b).sum()) for b in range(partition.num_blocks)]

