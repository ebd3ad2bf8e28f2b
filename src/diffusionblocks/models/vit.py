"""ViT classifiers: the label denoiser of DiffusionBlocks (method.md section 5) and the plain end-to-end baseline.

Label denoising. The class label is a point y = E[label] of a label-embedding table E with L2-normalised
rows (method.md section 5; the noise levels and preconditioning keep their EDM defaults). A block
sees the image's patch tokens and, in front of them in the CLS slot, the noisy label embedding c_in z; the
noise level enters every layer through adaLN-Zero. The layer-normalised output at that token is F (the
reference code's final LayerNorm, no projection); D = c_skip z + c_out F is the denoised embedding; a final
adaLN and a zero-initialised linear head turn D into class logits. Between inference steps the denoised
estimate is softmax(logits) @ E.

F is not zero at initialisation, unlike the DiT's output layer: with adaLN-Zero layers the trunk starts
as the identity, so F = LN(c_in z) and D = c_skip z + c_out LN(c_in z); the zero head makes the logits 0.
A zero-initialised projection in front of F (tried first) leaves three zero factors between the image
and the loss (head, projection, gates): on digits it cut block 0's accuracy at sigma_max from about 95%
to 75% after 600 steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..precond import append_dims, denoised, get_scalings, loss_weight
from .dit import DiTLayer, get_2d_sincos_pos_embed, xavier_init
from .layers import NoiseEmbedder, modulate, zero_init


class _ViTTrunk(nn.Module):
    """Patch embedding, fixed position embedding and adaLN-Zero layers over [CLS; patches]."""

    def __init__(self, image_size: int, in_channels: int, patch_size: int, hidden_size: int, depth: int,
                 num_heads: int, mlp_ratio: float):
        super().__init__()
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        pos = get_2d_sincos_pos_embed(hidden_size, image_size // patch_size)
        self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0), persistent=False)
        self.layers = nn.ModuleList([DiTLayer(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.checkpointing = False

    def run(self, cls: torch.Tensor, images: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """cls (N, D), images (N, C, H, W), conditioning c (N, D) -> the output at the CLS token (N, D)."""
        x = self.x_embedder(images).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        x = torch.cat([cls[:, None], x], dim=1)  # (N, 1 + T, D)
        for layer in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, c, use_reentrant=False)
            else:
                x = layer(x, c)
        return x[:, 0]  # (N, D)

    @torch.no_grad()
    def init_trunk(self, generator: torch.Generator | None) -> None:
        xavier_init(self, self.x_embedder, generator)
        for layer in self.layers:  # adaLN-Zero: every layer starts as the identity
            nn.init.zeros_(layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(layer.adaLN_modulation[-1].bias)


class ViTLabelDenoiser(nn.Module):
    """One block of a DiffusionBlocks classifier: denoises a label embedding given the image (section 5).

    The label embedding table E (num_classes x hidden_size) is a buffer when fixed and a parameter when
    learned; every block keeps its own copy so that its file is self-contained.
    """

    def __init__(self, image_size: int = 32, in_channels: int = 3, patch_size: int = 4, hidden_size: int = 128,
                 depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 100,
                 sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 learn_embedding: bool = False):
        super().__init__()
        self.num_classes, self.sigma_data = num_classes, sigma_data
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.trunk = _ViTTrunk(image_size, in_channels, patch_size, hidden_size, depth, num_heads, mlp_ratio)
        self.t_embedder = NoiseEmbedder(hidden_size)
        self.norm_out = nn.LayerNorm(hidden_size, eps=1e-6)  # F = norm_out(output at the CLS slot)
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_final = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.head = nn.Linear(hidden_size, num_classes)  # zero-initialised
        E = torch.zeros(num_classes, hidden_size)
        if learn_embedding:
            self.label_embedding = nn.Parameter(E)
        else:
            self.register_buffer("label_embedding", E)

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        self.trunk.init_trunk(generator)
        self.t_embedder.init_weights(generator)
        zero_init(self.head, self.adaLN_final[-1])
        # The label table is the run's, the same for every block: models.build_block sets it.

    @property
    def E(self) -> torch.Tensor:
        """The label table in denoising space, rows L2-normalised (a learned table stays on the sphere)."""
        return F.normalize(self.label_embedding, dim=-1)

    def denoise(self, z: torch.Tensor, sigma: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, logits) for the noisy label embedding z (N, D) at noise sigma (N,)."""
        z, sigma = z.float(), sigma.float()
        c_skip, c_out, c_in, c_noise = (append_dims(c, z.ndim) for c in get_scalings(sigma, self.sigma_data))
        c = self.t_embedder(c_noise.flatten())  # (N, D)
        h = self.trunk.run(c_in * z, images, c)  # (N, D)
        D = denoised(z, self.norm_out(h), c_skip, c_out)  # (N, D)
        shift, scale = self.adaLN_final(c).chunk(2, dim=1)
        logits = self.head(modulate(self.norm_final(D), shift, scale))  # (N, K)
        return D, logits

    def forward(self, z: torch.Tensor, sigma: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The denoised estimate in embedding space used between inference steps: softmax(logits) @ E."""
        _, logits = self.denoise(z, sigma, images)
        return logits.softmax(-1) @ self.E

    def loss(self, images: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
             weighting: str = "per_sample") -> torch.Tensor:
        """Per-sample cross-entropy of the logits at z = E[label] + sigma eps, weighted by lambda(sigma).

        weighting "per_sample": lambda(sigma_i) CE_i (method.md); "batch_mean": mean(lambda) CE_i, the
        reference code's weighting (the weight's batch mean times each sample's loss).
        """
        y = self.E[labels]  # (N, D)
        z = y + append_dims(sigma, y.ndim) * noise
        _, logits = self.denoise(z, sigma, images)
        ce = F.cross_entropy(logits, labels, reduction="none")
        w = loss_weight(sigma.float(), self.sigma_data)
        return (w.mean() if weighting == "batch_mean" else w) * ce


class ViTClassifier(nn.Module):
    """The end-to-end baseline: the same ViT as a plain classifier (learned CLS token, cross-entropy).

    The layers keep their adaLN-Zero form with a learned constant conditioning vector in place of the
    noise embedding, so the trunk is the same network the label-denoising blocks use.
    """

    def __init__(self, image_size: int = 32, in_channels: int = 3, patch_size: int = 4, hidden_size: int = 128,
                 depth: int = 12, num_heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 100):
        super().__init__()
        self.num_classes = num_classes
        self.trunk = _ViTTrunk(image_size, in_channels, patch_size, hidden_size, depth, num_heads, mlp_ratio)
        self.cls_token = nn.Parameter(torch.zeros(hidden_size))
        self.cond = nn.Parameter(torch.zeros(hidden_size))
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6)
        self.head = nn.Linear(hidden_size, num_classes)

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        self.trunk.init_trunk(generator)
        nn.init.normal_(self.cls_token, std=0.02, generator=generator)
        nn.init.normal_(self.cond, std=0.02, generator=generator)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        N = images.shape[0]
        h = self.trunk.run(self.cls_token.expand(N, -1), images, self.cond.expand(N, -1))
        return self.head(self.norm_final(h))

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample cross-entropy."""
        return F.cross_entropy(self.logits(images), labels, reduction="none")
