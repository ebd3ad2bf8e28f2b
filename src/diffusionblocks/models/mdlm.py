"""The masked-diffusion language model's block: a bidirectional transformer over a partly masked sequence.

Absorbing-state masked diffusion (MD4, Shi et al. 2024; MDLM, Sahoo et al. 2024): at time t each token
is replaced by the mask token with probability 1 - alpha(t). A block sees the partly masked sequence
and t (through adaLN-Zero in every layer) and gives logits over the V real tokens at every position;
the mask token is never predicted, and unmasked positions carry their token over unchanged. Like the
DiT blocks, each block owns its token and position embeddings, time embedder and output head.

Loss (method.md section 5): the ELBO integrand, the cross-entropy summed over the masked positions and
weighted by -alpha'(t) / (1 - alpha(t)), per token; t is drawn from the training density -alpha'(t), so
the per-sample weight divides that by the density: 1 / (1 - alpha(t)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..noise import MaskingTime
from .dit import DiTLayer
from .layers import NoiseEmbedder, modulate

T_SCALE = 1000.0  # t in [0, 1] enters the sinusoidal time embedding as 1000 t (DDPM's timestep range)
T_FLOOR = 1e-6    # t is kept above this in the loss, where 1 / (1 - alpha(t)) would be infinite


class MaskedDiffusionTransformer(nn.Module):
    """Logits over the vocabulary at every position of x_t, given the masking time t; `depth` layers of one block.

    Args:
        vocab_size: V real tokens; id V is the mask token.
        seq_len: the longest sequence (position embeddings).
        hidden_size, depth, num_heads, mlp_ratio: transformer size.
        axis: the masking schedule.
        t_min, t_max: the range of t this block was trained for (advertised, like a denoiser's sigma range).
    """

    def __init__(self, vocab_size: int, seq_len: int, hidden_size: int = 256, depth: int = 6, num_heads: int = 4,
                 mlp_ratio: float = 4.0, axis: MaskingTime = MaskingTime(), t_min: float = 0.0, t_max: float = 1.0):
        super().__init__()
        self.vocab_size, self.mask_id, self.seq_len = vocab_size, vocab_size, seq_len
        self.axis, self.sigma_min, self.sigma_max = axis, t_min, t_max
        self.tok_embed = nn.Embedding(vocab_size + 1, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, hidden_size))
        self.t_embedder = NoiseEmbedder(hidden_size)
        self.layers = nn.ModuleList([DiTLayer(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_final = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.head = nn.Linear(hidden_size, vocab_size)
        self.checkpointing = False

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """Xavier linears, N(0, 0.02) embeddings; a zero head, so a fresh block predicts the uniform distribution
        (log2 V bits per masked character).

        The layers' adaLN modulation starts at zero but for the residual gates, which start open (1), unlike
        the DiT's adaLN-Zero: with closed gates the blocks learned to read context on text far more slowly
        (tinyshakespeare, 2 layers of width 64, 15% masked, 300 steps: held-out CE 3.28 nats per masked
        character, the unigram level, against 2.85 with open gates).
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=generator)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.tok_embed.weight, std=0.02, generator=generator)
        nn.init.normal_(self.pos_embed, std=0.02, generator=generator)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02, generator=generator)
        for lin in [layer.adaLN_modulation[-1] for layer in self.layers] + [self.adaLN_final[-1], self.head]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        H = self.tok_embed.embedding_dim
        for layer in self.layers:  # chunks: shift, scale, gate (attention), shift, scale, gate (MLP)
            layer.adaLN_modulation[-1].bias[2 * H:3 * H] = 1
            layer.adaLN_modulation[-1].bias[5 * H:6 * H] = 1

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t (N, L) token ids with mask_id where masked, t (N,) -> logits (N, L, V)."""
        L = x_t.shape[1]
        h = self.tok_embed(x_t) + self.pos_embed[:, :L]  # (N, L, D)
        c = self.t_embedder(T_SCALE * t.float())  # (N, D)
        for layer in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, c, use_reentrant=False)
            else:
                h = layer(h, c)  # (N, L, D)
        shift, scale = self.adaLN_final(c).chunk(2, dim=1)
        return self.head(modulate(self.norm_final(h), shift[:, None], scale[:, None])).float()  # (N, L, V)

    def loss(self, tokens: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Per-sequence ELBO integrand in nats per token (N,); position i is masked where u_i < 1 - alpha(t)."""
        t = t.float().clamp_min(T_FLOOR)
        keep = self.axis.alpha(t).float().to(t.device)  # alpha(t), (N,)
        masked = u < (1 - keep)[:, None]  # (N, L)
        logits = self(torch.where(masked, self.mask_id, tokens), t)
        ce = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")  # (N, L)
        w = 1 / (1 - keep)  # -alpha'(t) / (1 - alpha(t)), divided by t's density -alpha'(t)
        return w * (ce * masked).sum(1) / tokens.shape[1]
