"""Recurrent-depth language models (method.md section 5, fifth row; Huginn, Geiping et al. 2025).

Both are a prelude of layers that embeds the tokens, a core of layers applied to a latent state, and a coda.

`HuginnLM`, the baseline: the state starts as Gaussian noise; each iteration the core reads the prelude's
output and the state (concatenated and projected, as Huginn does) and writes a new state; after r iterations
the coda and a causal LM head read the state out as the next token's distribution. Training draws r per step
(`lognormal_poisson`) and backpropagates through the last `bptt` iterations only.

`RecurrentDenoiser`, DiffusionBlocks' reading: one denoiser of the next token's embedding (the
`models.arlm.ARDenoiser` of the autoregressive task, B=1) whose clean stream is the prelude's output and whose
noisy stream, the state, passes the core and the coda with adaLN-Zero on sigma. The clean stream stops at
the prelude: the core and coda attend to it (their own keys and values of it) but do not change it, so per
generated token the prelude runs once and each sampler step runs the core (and coda) once. Training is one
forward pass at a sampled sigma: no recurrence, no backpropagation through time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .arlm import CAUSAL, ARDenoiser, Cond, KVCache, LlamaLayer, _extend_mask, _Trunk, init_llama, rotary
from .layers import RMSNorm


def lognormal_poisson(mean: float, std: float, generator: torch.Generator) -> int:
    """Huginn's number of iterations: tau ~ N(ln(mean) - std^2 / 2, std), r = Poisson(e^tau) + 1 (mean about mean + 1)."""
    tau = math.log(mean) - std ** 2 / 2 + std * float(torch.randn(1, generator=generator, dtype=torch.float64,
                                                                    device=generator.device))
    return int(torch.poisson(torch.tensor([math.exp(tau)], dtype=torch.float64), generator=generator)) + 1


class HuginnLM(nn.Module):
    """Prelude / recurrent core / coda causal LM; position j's logits are the distribution of token j + 1."""

    def __init__(self, vocab_size: int, hidden_size: int = 256, num_heads: int = 4, mlp_ratio: float = 4.0,
                 prelude: int = 2, core: int = 4, coda: int = 2, state_std: float = 1.0, mlp_multiple: int = 1):
        super().__init__()
        self.vocab_size, self.state_std = vocab_size, state_std
        self.tok_embed = nn.Embedding(vocab_size, hidden_size)
        self.cond = nn.Parameter(torch.zeros(hidden_size))  # the layers' adaLN conditioning: a learned constant
        layers = lambda n: nn.ModuleList([LlamaLayer(hidden_size, num_heads, mlp_ratio, mlp_multiple)  # noqa: E731
                                           for _ in range(n)])
        self.prelude, self.core, self.coda = layers(prelude), layers(core), layers(coda)
        self.adapter = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.norm_final = RMSNorm(hidden_size, eps=1e-6)
        self.head = nn.Linear(hidden_size, vocab_size)

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        init_llama(self, self.tok_embed, self.cond, [*self.prelude, *self.core, *self.coda], generator)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _stack(self, layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        layer0 = layers[0].attn
        pos = rotary(torch.arange(L, device=x.device), layer0.qkv.in_features // layer0.num_heads)
        for layer in layers:
            x, _ = layer(x, self.cond, pos, CAUSAL)  # a constant condition: its gates folded into the weights
        return x

    def core_step(self, state: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """One iteration: the core on the projection of [state ; prelude output] (N, L, 2D) -> the new state."""
        return self._stack(self.core, self.adapter(torch.cat([state, e], dim=-1)))

    def forward(self, tokens: torch.Tensor, iterations: int, state: torch.Tensor, bptt: int | None = None) -> torch.Tensor:
        """tokens (N, L), the initial state (N, L, D) -> logits (N, L, V) after `iterations` core steps; with bptt,
        gradients flow through the last bptt iterations only (the earlier ones run without autograd)."""
        e = self._stack(self.prelude, self.tok_embed(tokens))
        s = state * self.state_std
        for i in range(iterations):
            tracked = bptt is None or i >= iterations - bptt
            with torch.set_grad_enabled(tracked and torch.is_grad_enabled()):
                s = self.core_step(s, e)
        return self.head(self.norm_final(self._stack(self.coda, s))).float()

    def loss(self, tokens: torch.Tensor, iterations: int, state: torch.Tensor, bptt: int) -> torch.Tensor:
        """Per-sequence mean next-token cross-entropy over positions 1..L-1, after `iterations` core steps."""
        logits = self(tokens, int(iterations), state, int(bptt))[:, :-1]
        return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)


class _PreludeTrunk(_Trunk):
    """The trunk of a RecurrentDenoiser: layers[:prelude] make the clean stream from the tokens (causal); the
    other layers (core, coda) run the noisy stream and attend to the clean one without changing it."""

    def __init__(self, vocab_size: int, hidden_size: int, num_heads: int, mlp_ratio: float, prelude: int, rest: int,
                 mlp_multiple: int = 1):
        super().__init__(vocab_size, hidden_size, prelude + rest, num_heads, mlp_ratio, mlp_multiple)
        self.prelude = prelude

    def noisy_layers(self) -> list[tuple[int, nn.Module]]:
        return list(enumerate(self.layers))[self.prelude:]

    def run(self, x: torch.Tensor, c: Cond, pos: torch.Tensor, mask: torch.Tensor | None,
            queries: int | None = None) -> torch.Tensor:
        """x [noisy ; clean] (N, 2L, D), c (c_noisy, c_clean), the training mask (2L, 2L) -> (N, 2L, D), or the noisy
        rows alone (N, L, D) with queries=L."""
        L = x.shape[1] // 2
        noisy, clean = x[:, :L], x[:, L:]  # [noisy ; clean]
        rot = self.rotary(pos)
        clean_rot = rot[L:]
        for layer in self.layers[:self.prelude]:
            clean, _ = layer(clean, c[1], clean_rot, CAUSAL)
        for layer in self.layers[self.prelude:]:
            # The clean rows keep the prelude's output: of them, a layer makes only its keys and values.
            noisy, _ = layer(torch.cat([noisy, clean], dim=1), c, rot, mask, None, L)
        return noisy if queries == L else torch.cat([noisy, clean], dim=1)

    def extend(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """The prelude on the new tokens (with its cache), then each later layer's keys and values of its output."""
        T = tokens.shape[1]
        start = cache.length
        pos = self.rotary(torch.arange(start, start + T, device=tokens.device))
        c, mask = self.clean_cond, _extend_mask(start, T, tokens.device)
        x = self.tok_embed(tokens)
        for l, layer in enumerate(self.layers):
            past = None if cache.k[l] is None else (cache.k[l], cache.v[l])
            if l < self.prelude:
                x, (k, v) = layer(x, c, pos, mask, past)
            else:
                k, v = layer.kv(x, c, pos)
            cache.k[l] = k if past is None else torch.cat([past[0], k], 2)
            cache.v[l] = v if past is None else torch.cat([past[1], v], 2)
        return x


class RecurrentDenoiser(ARDenoiser):
    """A recurrent-depth network as one denoiser of the next token's embedding: prelude (clean stream), core and
    coda (noisy stream, adaLN on sigma). Everything else (readout, bridges, loss, cache) is the ARDenoiser's."""

    def __init__(self, vocab_size: int, hidden_size: int = 256, num_heads: int = 4, mlp_ratio: float = 4.0,
                 prelude: int = 2, core: int = 4, coda: int = 2, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, mlp_multiple: int = 1):
        super().__init__(vocab_size, hidden_size, core + coda, num_heads, mlp_ratio, sigma_data, sigma_min, sigma_max,
                         trunk=_PreludeTrunk(vocab_size, hidden_size, num_heads, mlp_ratio, prelude, core + coda,
                                             mlp_multiple))
        self.num_prelude, self.num_core = prelude, core

    @property
    def core(self) -> list[nn.Module]:
        return list(self.trunk.layers[self.num_prelude:self.num_prelude + self.num_core])

    @property
    def prelude(self) -> list[nn.Module]:
        return list(self.trunk.layers[:self.num_prelude])
