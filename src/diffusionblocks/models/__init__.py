"""Denoiser architectures, and the factory that builds one block of a run from its config."""

from __future__ import annotations

import torch

from ..config import RunConfig
from ..noise import LogNormalSigma, Partition
from ..precond import Denoiser
from .dit import DiT
from .vit import ViTClassifier, ViTLabelDenoiser, label_embedding_table

__all__ = ["DiT", "ViTClassifier", "ViTLabelDenoiser", "build_block", "build_partition", "run_label_embedding"]


def build_partition(cfg: RunConfig) -> Partition:
    """The run's partition of the noise axis into cfg.blocks.num_blocks ranges."""
    n = cfg.noise
    axis = LogNormalSigma(P_mean=n.P_mean, P_std=n.P_std, sigma_min=n.sigma_min, sigma_max=n.sigma_max)
    return Partition(axis, cfg.blocks.num_blocks, kind=cfg.blocks.partition, gamma=cfg.blocks.gamma)


def run_label_embedding(cfg: RunConfig) -> torch.Tensor:
    """The run's initial label-embedding table, the same for every block: drawn from (seed, "label-embedding")."""
    from ..data import make_generator

    return label_embedding_table(cfg.model.num_classes, cfg.model.hidden_size,
                                 make_generator(cfg.train.seed, "label-embedding"))


def build_block(cfg: RunConfig, b: int, generator: torch.Generator | None = None) -> torch.nn.Module:
    """Block b of the run, initialised from `generator`.

    Image generation: an EDM denoiser around a DiT of the block's layers. Classification: a ViT label
    denoiser of the block's layers (or, for classify.mode="plain", the whole ViT as a plain classifier).
    """
    m = cfg.model
    if cfg.task == "classify":
        vit = dict(image_size=m.image_size, in_channels=m.in_channels, patch_size=m.patch_size,
                   hidden_size=m.hidden_size, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, num_classes=m.num_classes)
        if cfg.classify.mode == "plain":
            net = ViTClassifier(depth=m.depth, **vit)
            net.initialize_weights(generator)
            return net
        lo, hi = build_partition(cfg).training_range(b)
        mode = cfg.classify.label_embedding
        learn = mode == "learned_joint" or (mode == "learned_first" and b == 0)
        net = ViTLabelDenoiser(depth=cfg.layer_split()[b], sigma_data=cfg.noise.sigma_data, sigma_min=lo,
                               sigma_max=hi, learn_embedding=learn, **vit)
        net.initialize_weights(generator)
        with torch.no_grad():
            net.label_embedding.copy_(run_label_embedding(cfg))
        return net
    depth = cfg.layer_split()[b]
    net = DiT(image_size=m.image_size, in_channels=m.in_channels, patch_size=m.patch_size,
              hidden_size=m.hidden_size, depth=depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
              num_classes=m.num_classes)
    net.initialize_weights(generator)
    lo, hi = build_partition(cfg).training_range(b)
    return Denoiser(net, sigma_data=cfg.noise.sigma_data, sigma_min=lo, sigma_max=hi)
