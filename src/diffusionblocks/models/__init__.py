"""Denoiser architectures: the DiT block of image generation, the ViT label denoiser and plain ViT of classification.

Which architecture a run's blocks use is its task's choice (`diffusionblocks.tasks`); build a run's block
with its task's `build_block` (`diffusionblocks.tasks.get_task(cfg.task).build_block(cfg, b)`).
"""

from .dit import DiT
from .layers import label_embedding_table
from .vit import ViTClassifier, ViTLabelDenoiser

__all__ = ["DiT", "ViTClassifier", "ViTLabelDenoiser", "label_embedding_table"]
