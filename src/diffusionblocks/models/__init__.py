"""Denoiser architectures, and the factory that builds one block of a run from its config."""

from __future__ import annotations

import torch

from ..config import RunConfig
from ..noise import LogNormalSigma, Partition
from ..precond import Denoiser
from .dit import DiT

__all__ = ["DiT", "build_block", "build_partition"]


def build_partition(cfg: RunConfig) -> Partition:
    """The run's partition of the noise axis into cfg.blocks.num_blocks ranges."""
    n = cfg.noise
    axis = LogNormalSigma(P_mean=n.P_mean, P_std=n.P_std, sigma_min=n.sigma_min, sigma_max=n.sigma_max)
    return Partition(axis, cfg.blocks.num_blocks, kind=cfg.blocks.partition, gamma=cfg.blocks.gamma)


def build_block(cfg: RunConfig, b: int, generator: torch.Generator | None = None) -> Denoiser:
    """Block b of the run: an EDM denoiser around a DiT of the block's layers, initialised from `generator`."""
    m = cfg.model
    depth = cfg.layer_split()[b]
    net = DiT(image_size=m.image_size, in_channels=m.in_channels, patch_size=m.patch_size,
              hidden_size=m.hidden_size, depth=depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
              num_classes=m.num_classes)
    net.initialize_weights(generator)
    lo, hi = build_partition(cfg).training_range(b)
    return Denoiser(net, sigma_data=cfg.noise.sigma_data, sigma_min=lo, sigma_max=hi)
