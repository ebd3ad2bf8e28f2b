"""Layers the architectures share: adaLN modulation, the noise embedder, zero initialisation and the tables of
orthonormal target embeddings (labels, tokens) that label and token denoisers denoise in (method.md section 5)."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN (DiT): x * (1 + scale) + shift; shift and scale broadcastable to x (per token, per sample or constant)."""
    return x * (1 + scale) + shift


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
