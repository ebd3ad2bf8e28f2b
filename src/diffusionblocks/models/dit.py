"""DiT (Peebles & Xie 2023) as the raw network F of an EDM denoiser, cut into self-contained blocks.

A block is a whole DiT of `depth` = L/B layers: it owns private copies of the patch embedding,
the noise and class embedders and the final layer, so blocks share no trained parameter and can
be trained in any order or place. depth = L is the ordinary end-to-end model (B = 1).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import NoiseEmbedder, modulate


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2D sine-cosine position embedding (MAE / DiT), shape (grid_size^2, embed_dim)."""
    grid_h, grid_w = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                                 indexing="ij")

    def emb_1d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # Width first, height second, as in DiT (its meshgrid puts w first).
    return np.concatenate([emb_1d(embed_dim // 2, grid_w), emb_1d(embed_dim // 2, grid_h)], axis=1)


@torch.no_grad()
def xavier_init(module: nn.Module, x_embedder: nn.Conv2d, generator: torch.Generator | None) -> None:
    """Xavier-uniform weights and zero biases for every Linear of `module` and for the patch embedding
    (treated like a Linear on the flattened kernel), drawn from `generator` (DiT's initialisation)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, generator=generator)
            nn.init.zeros_(m.bias)
    w = x_embedder.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1), generator=generator)
    nn.init.zeros_(x_embedder.bias)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with biased projections; positions are added to the input (DiT)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, C = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, N, H, T, C/H)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (N, H, T, C/H)
        return self.proj(x.transpose(1, 2).reshape(N, T, C))


class DiTLayer(nn.Module):
    """A transformer layer with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa[:, None], scale_msa[:, None]))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp[:, None], scale_mlp[:, None]))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift[:, None], scale[:, None]))


class DiT(nn.Module):
    """F(c_in z, c_noise | class_labels) -> image-shaped output; `depth` layers of one block.

    Args:
        image_size, in_channels, patch_size: image geometry; T = (image_size / patch_size)^2 tokens.
        hidden_size, depth, num_heads, mlp_ratio: transformer size.
        num_classes: classes; label index num_classes is the null class used by guidance. 0 = unconditional.
    """

    def __init__(self, image_size: int = 32, in_channels: int = 3, patch_size: int = 2, hidden_size: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, num_classes: int = 10):
        super().__init__()
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        num_patches = (image_size // patch_size) ** 2
        pos = get_2d_sincos_pos_embed(hidden_size, image_size // patch_size)
        self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0), persistent=False)
        self.t_embedder = NoiseEmbedder(hidden_size)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if num_classes > 0 else None
        self.layers = nn.ModuleList([DiTLayer(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.checkpointing = False  # activation checkpointing of each layer in training
        assert self.pos_embed.shape[1] == num_patches

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """DiT's initialisation, every parameter drawn from `generator` so a block's init depends on its seed only."""
        xavier_init(self, self.x_embedder, generator)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02, generator=generator)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02, generator=generator)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02, generator=generator)
        # Zero-out adaLN modulation: every layer starts as the identity.
        for layer in self.layers:
            nn.init.zeros_(layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(layer.adaLN_modulation[-1].bias)
        # Zero-out the output layer: F = 0, so a fresh block's denoiser returns c_skip * z.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.in_channels, self.patch_size
        h = w = int(math.isqrt(x.shape[1]))
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D), T = H * W / p^2
        c = self.t_embedder(c_noise)  # (N, D)
        if self.y_embedder is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            c = c + self.y_embedder(class_labels)
        for layer in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, c, use_reentrant=False)  # (N, T, D); recomputed in backward
            else:
                x = layer(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p^2 C)
        return self.unpatchify(x)  # (N, C, H, W)
