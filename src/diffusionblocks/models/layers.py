"""Layers the architectures share: adaLN modulation, RMSNorm, the noise embedder, zero initialisation and the tables
of orthonormal target embeddings (labels, tokens) that label and token denoisers denoise in (method.md section 5)."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN (DiT): x * (1 + scale) + shift; shift and scale broadcastable to x (per token, per sample or constant)."""
    return x * (1 + scale) + shift


def _inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dimension of x (..., D): (..., 1), from one reduction pass."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()


def _rms_norm_backward(g: torch.Tensor, n: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The gradient of n = x r (RMSNorm) with respect to x, from the gradient g of n: (g - n mean(g n)) r."""
    gn = (g * n).sum(-1, keepdim=True)  # (..., 1): D mean(g n)
    return torch.addcmul(g, n, gn, value=-1 / n.shape[-1]).mul_(r)


class _RMSNormFunction(torch.autograd.Function):
    """n = x / sqrt(mean(x^2) + eps) over the last dimension, with its gradient written out: two full passes forward
    and four back, where PyTorch's CPU RMSNorm has a fused forward but a composite backward of about ten (2.5x slower
    in a layer of the language trunk, issue 26)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        r = _inverse_rms(x, eps)
        n = x * r
        ctx.save_for_backward(n, r)
        return n

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        n, r = ctx.saved_tensors
        return _rms_norm_backward(g, n, r), None


class _ModulatedRMSNormFunction(torch.autograd.Function):
    """adaLN on RMSNorm, n (1 + scale) + shift with n = RMSNorm(x), shift and scale broadcastable to x (per token, per
    sample or constant), as one autograd node: a reduction and two products forward, eight operations back, where the
    composite (PyTorch's RMSNorm, then addcmul) takes about sixteen in three nodes. For a constant condition (shift
    and scale (D,)) the gradient comes from PyTorch's fused LayerNorm backward: with mean 0 and rstd = 1 / rms(x)
    that kernel gives the gradients of shift and scale (as bias and weight) and of x up to one term, r mean(g (1 +
    scale)) per row, added from a matrix-vector product (issue 26)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        r = _inverse_rms(x, eps)
        n = x * r
        a = 1 + scale
        ctx.constant = shift.shape == scale.shape == x.shape[-1:]
        ctx.save_for_backward(x if ctx.constant else n, r, a)
        ctx.shapes = shift.shape, scale.shape
        return torch.addcmul(shift, n, a)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.constant:
            x, r, a = ctx.saved_tensors
            D = x.shape[-1]
            g = g.contiguous()
            g_x, g_scale, g_shift = torch.ops.aten.native_layer_norm_backward(
                g, x, [D], torch.zeros_like(r), r, a, a, [True, True, True])
            # LayerNorm's backward also takes the gradient's row mean out of g_x (its mean's path); RMSNorm has none.
            g_x.add_(torch.mv(g.view(-1, D), a).view_as(r).mul_(r), alpha=1 / D)
            return g_x, g_shift, g_scale, None
        n, r, a = ctx.saved_tensors
        shift_shape, scale_shape = ctx.shapes
        g_shift = g.sum_to_size(shift_shape) if ctx.needs_input_grad[1] else None
        g_scale = (g * n).sum_to_size(scale_shape) if ctx.needs_input_grad[2] else None
        g_x = _rms_norm_backward(g * a, n, r) if ctx.needs_input_grad[0] else None
        return g_x, g_shift, g_scale, None


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm without weights over the last dimension (Zhang and Sennrich 2019): the same numbers as `F.rms_norm`,
    whose fused kernels serve CUDA and every forward without gradient; on other devices in training, the written-out
    gradient above (in float32 for half inputs)."""
    if x.is_cuda or not _needs_grad(x):
        return F.rms_norm(x, x.shape[-1:], eps=eps)
    if x.dtype in (torch.float32, torch.float64):
        return _RMSNormFunction.apply(x, eps)
    return _RMSNormFunction.apply(x.float(), eps).to(x.dtype)


def modulated_rms_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """adaLN (DiT) on RMSNorm: RMSNorm(x) (1 + scale) + shift, shift and scale broadcastable to x (N, T, D)."""
    if x.is_cuda or not _needs_grad(x, shift, scale):
        return torch.addcmul(shift, F.rms_norm(x, x.shape[-1:], eps=eps), 1 + scale)
    if x.dtype == shift.dtype == scale.dtype in (torch.float32, torch.float64):
        return _ModulatedRMSNormFunction.apply(x, shift, scale, eps)
    dtype = torch.promote_types(torch.promote_types(x.dtype, shift.dtype), scale.dtype)
    if dtype not in (torch.float32, torch.float64):  # half inputs: the norm in float32
        return _ModulatedRMSNormFunction.apply(x.float(), shift.float(), scale.float(), eps).to(dtype)
    return _ModulatedRMSNormFunction.apply(x, shift, scale, eps)


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` (the same parameters and state dict) on the faster `rms_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = rms_norm(x, 1e-6 if self.eps is None else self.eps)
        return y if self.weight is None else y * self.weight


_LAYER_KEY = re.compile(r"(?:^|(?<=\.))layers\.(\d+)\.")


def take_layers(weights: dict[str, torch.Tensor], first: int, last: int) -> dict[str, torch.Tensor]:
    """The weights of a network made of layers [first, last) of the network `weights` (its `layers.i.` entries,
    renumbered from 0) and every weight outside its layers (embeddings, embedders, head): a depth split of a trained
    network (method.md section 8). Each tensor is a copy, so the new network shares nothing with the old."""
    out = {}
    for key, w in weights.items():
        m = _LAYER_KEY.search(key)
        if m is None:
            out[key] = w.clone()
        elif first <= int(m[1]) < last:
            out[key[:m.start(1)] + str(int(m[1]) - first) + key[m.end(1):]] = w.clone()
    return out


def label_embedding_table(num_classes: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """A random table with orthonormal rows where num_classes <= dim (QR of a Gaussian), else unit rows."""
    g = torch.randn(dim, num_classes, generator=generator)
    if num_classes <= dim:
        q, _ = torch.linalg.qr(g)  # (dim, K), orthonormal columns
        E = q.T
    else:
        E = g.T
    return F.normalize(E, dim=-1)


class NoiseEmbedder(nn.Module):
    """Embeds c_noise = ln(sigma)/4 with EDM's sinusoidal positional embedding, then an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_positions: int = 10000):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_positions = max_positions
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """N(0, 0.02) weights and zero biases, drawn from generator (the label-denoising and language blocks')."""
        for lin in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02, generator=generator)
            nn.init.zeros_(lin.bias)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = (1 / self.max_positions) ** (torch.arange(half, device=c_noise.device, dtype=torch.float32) / (half - 1))
        args = c_noise.float()[:, None] * freqs[None]  # (N, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (N, frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


@torch.no_grad()
def zero_init(*linears: nn.Linear) -> None:
    """Zero weights and biases: heads and adaLN modulations that start as nothing."""
    for lin in linears:
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
