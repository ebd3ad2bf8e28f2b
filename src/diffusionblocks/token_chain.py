"""The chain of token denoisers at inference (the autoregressive and recurrent-depth language models): a token's
noise levels down the chain, token draws by inverse CDF, the clean context with its KV caches, generation, and the
chain teacher-forced on held-out windows with its per-step diagnostics.

A chain here is a BlockwiseDenoiser of token denoisers (ARDenoiser, RecurrentDenoiser): each block returns (D,
logits) for noisy token embeddings after a clean context, and a bridge hands the sampler its estimate between steps
(`BridgedDenoiser`, method.md section 5). The chain's own likelihood of held-out text is in chain_likelihood.py.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .blocks import BridgedDenoiser
from .config import ConfigError
from .models.arlm import CausalLM, KVCache
from .noise import sigma_grid
from .precond import append_dims
from .sampling import SAMPLERS
from .seeding import make_generator
from .text import usable_logits


def chain_grid(model, steps: int | None = None, grid: str = "quantile") -> torch.Tensor:
    """A token's noise levels down the chain: `steps` (default B) of the grid named `grid` over the model's
    partition, descending, then 0, float64."""
    try:
        return sigma_grid(model.partition.axis, steps or model.num_blocks, grid, partition=model.partition)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def draw_token(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool, u: torch.Tensor) -> torch.Tensor:
    """A token per row of logits (N, V): the argmax, or a draw by inverse CDF from the uniforms u (N,) of the
    temperature-scaled distribution cut to its top-p nucleus."""
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_p, order = probs.sort(-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
    sorted_p = sorted_p * keep
    cdf = sorted_p.cumsum(-1) / sorted_p.sum(-1, keepdim=True)
    k = (cdf < u[:, None]).sum(-1).clamp_max(probs.shape[-1] - 1)
    return order.gather(-1, k[:, None])[:, 0]


class TokenContext:
    """The clean tokens a generation step may read: a window of at most `window` - 1 tokens that moves on by half
    a window when full; with `cached`, a KV cache of the window for each trunk that asks for one (`cache`), re-filled
    when the window moves. `last[trunk]`: the trunk's output at the window's last token."""

    def __init__(self, tokens: torch.Tensor, window: int, cached: bool, trunks: tuple = ()):
        self.window, self.cached = window, cached
        self.tokens, self.start = tokens, 0
        self.caches, self.last = {}, {}
        self._move()
        for trunk in trunks if cached else ():
            self.cache(trunk)

    def _move(self) -> bool:
        moved = False
        while self.tokens.shape[1] - self.start > self.window - 1:
            self.start += self.window // 2
            moved = True
        return moved

    def cache(self, trunk) -> Any:
        """trunk's KV cache of the window, made and filled on first use."""
        if trunk not in self.caches:
            self.caches[trunk] = KVCache(len(trunk.layers))
            if self.tokens.shape[1] > self.start:
                self.last[trunk] = trunk.extend(self.caches[trunk], self.tokens[:, self.start:])[:, -1]
        return self.caches[trunk]

    @property
    def window_tokens(self) -> torch.Tensor:
        return self.tokens[:, self.start:]

    def append(self, token: torch.Tensor) -> None:
        self.tokens = torch.cat([self.tokens, token[:, None]], dim=1)
        if self._move():
            trunks = list(self.caches)
            self.caches, self.last = {}, {}
            for trunk in trunks:
                self.cache(trunk)
        else:
            for trunk, cache in self.caches.items():
                self.last[trunk] = trunk.extend(cache, token[:, None])[:, -1]


@torch.no_grad()
def generate_chain(model, prompts: torch.Tensor, new: int, *, window: int, steps: int | None = None,
                   bridge: str = "sample", temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                   seeds: list[int] | None = None, cache: bool = True, num_tokens: int | None = None,
                   sampler: str = "euler", grid: str = "quantile") -> torch.Tensor:
    """Continues prompts (N, P) by `new` tokens with a BlockwiseDenoiser of ARDenoiser blocks; returns (N, P + new).
    Each token is `sampler` run down `grid` (`chain_grid`) of `steps` points (default B), the estimate handed on by the
    bridge, the last evaluation's logits read out. Sample i draws its noise and readout uniforms from the generator
    of seed i (the `sample` bridge: one more uniform per evaluation). num_tokens: the vocabulary's size, when the
    model has more ids; the ids above it are never drawn or bridged.

    Without the cache every evaluation runs the block's full training forward over the window
    (`ARDenoiser.denoise`); with it, the clean window is kept as keys and values (`ARDenoiser.denoise_next`).
    """
    N = prompts.shape[0]
    device = prompts.device
    sigmas = chain_grid(model, steps, grid).to(device, torch.float32)  # (steps + 1,), last 0
    D_dim = model.blocks[0].E.shape[1]
    gens = [make_generator(s, "arlm-sample") for s in (seeds if seeds is not None else range(N))]
    ctx = TokenContext(prompts, window, cache)

    def denoise(block, z: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cache:
            D, logits = block.denoise_next(z, sigma, ctx.cache(block.trunk))
        else:  # the training forward on the window, the new position last (its clean token is never seen)
            w = ctx.window_tokens
            n, T = z.shape[0], w.shape[1] + 1
            zs = torch.cat([torch.zeros(n, T - 1, D_dim, device=device), z[:, None]], dim=1)
            unseen = torch.zeros(n, 1, dtype=torch.long, device=device)  # the new position's clean token
            D, logits = block.denoise(zs, sigma[:, None].expand(n, T), torch.cat([w, unseen], dim=1))
            D, logits = D[:, -1], logits[:, -1]
        return D, usable_logits(logits, num_tokens)

    def carry(block, D: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        token = None
        if bridge == "sample":  # a uniform per evaluation for the token it draws
            u_step = torch.stack([torch.rand(1, generator=g, dtype=torch.float64) for g in gens])[:, 0].to(device)
            token = draw_token(logits, temperature, top_p, greedy, u_step)
        return block.estimate(D, logits, bridge, token)

    chain = BridgedDenoiser(model, carry, denoise)
    for _ in range(new):
        eps = torch.stack([torch.randn(D_dim, generator=g) for g in gens]).to(device)  # (N, D)
        u = torch.stack([torch.rand(1, generator=g, dtype=torch.float64) for g in gens])[:, 0].to(device)
        SAMPLERS[sampler](chain, eps * sigmas[0], sigmas, disable=True)
        ctx.append(draw_token(chain.logits, temperature, top_p, greedy, u))  # the last evaluation's logits
    return ctx.tokens


def is_plain(model) -> bool:
    """Whether a router holds the end-to-end baseline (one CausalLM) rather than a chain of token denoisers."""
    return isinstance(model.blocks[0], CausalLM)


@torch.no_grad()
def generate_plain(model, prompts: torch.Tensor, new: int, *, window: int, temperature: float = 1.0,
                   top_p: float = 1.0, greedy: bool = False, seeds: list[int] | None = None,
                   cache: bool = True, num_tokens: int | None = None) -> torch.Tensor:
    """The same for the end-to-end baseline (a CausalLM); the readout uniforms are drawn as generate_chain draws them."""
    N = prompts.shape[0]
    D_dim = model.trunk.tok_embed.embedding_dim
    gens = [make_generator(s, "arlm-sample") for s in (seeds if seeds is not None else range(N))]
    ctx = TokenContext(prompts, window, cache, (model.trunk,))
    for _ in range(new):
        for g in gens:  # the chain's noise draw, skipped, so that a sample's readout uniforms match
            torch.randn(D_dim, generator=g)
        u = torch.stack([torch.rand(1, generator=g, dtype=torch.float64) for g in gens])[:, 0].to(prompts.device)
        logits = model.next_logits(ctx.last[model.trunk]) if cache else model(ctx.window_tokens)[:, -1]
        logits = usable_logits(logits, num_tokens)
        ctx.append(draw_token(logits, temperature, top_p, greedy, u))
    return ctx.tokens


def at_each_position(sigma: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The samplers' noise level per sequence (N,) at every position of tokens (N, L), as a contiguous (N, L)."""
    return sigma[:, None].expand(tokens.shape).contiguous()


@torch.no_grad()
def _teacher_forced_chain(model, x: torch.Tensor, sigmas: torch.Tensor, bridge: str, g: torch.Generator, *,
                          sampler: str = "euler", callback=None) -> torch.Tensor:
    """The sampler's chain on every position of windows x (N, L) at once, the clean context given (the training
    forward; each block's clean stream run once, `denoise_cached`); returns the last evaluation's logits (N, L, V).
    callback(k, logits, estimate) after step k's evaluation at its own sigma. The noise and the `sample` bridge's draws
    (temperature 1) come from g."""
    clean: dict[int, KVCache] = {}

    def denoise(block, z: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor):
        if id(block) not in clean:  # every row is at one sigma, so a block is handed all of x
            clean[id(block)] = block.clean_cache(tokens)
        return block.denoise_cached(z, at_each_position(sigma, tokens), clean[id(block)])

    def carry(block, D: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        token = None
        if bridge == "sample":
            u = torch.rand(logits.shape[:-1], generator=g, dtype=torch.float64).to(x.device).flatten()
            token = draw_token(logits.flatten(0, 1), 1.0, 1.0, False, u).view(logits.shape[:-1])
        return block.estimate(D, logits, bridge, token)

    chain = BridgedDenoiser(model, carry, denoise)
    step = None if callback is None else lambda d: callback(d["i"], chain.logits, d["denoised"])
    z = torch.randn(*x.shape, model.blocks[0].E.shape[1], generator=g).to(x.device) * sigmas[0]  # (N, L, D)
    SAMPLERS[sampler](chain, z, sigmas, extra_args={"tokens": x}, callback=step, disable=True)
    return chain.logits


def _oracle(block, eps: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's (D, logits) on E[tokens] + sigma eps, the noisy input it was trained on."""
    z = block.E[tokens] + append_dims(sigma, eps.ndim) * eps
    return block.denoise(z, at_each_position(sigma, tokens), tokens)


@torch.no_grad()
def chain_bits(model, windows: torch.Tensor, *, bridge: str, steps: int | None = None, seed: int = 0,
               batch_size: int = 64, sampler: str = "euler", grid: str = "quantile") -> list[dict[str, Any]]:
    """The chain teacher-forced on held-out windows: per step, the bits per token and the top-1 error of the owning
    block's logits on the chain's own state and on the oracle input E[x] + sigma eps, and the norm of the chain's
    estimate (a collapse toward 0 shows here). Positions 1..L-1, as next_token_bits (position 0 has no context)."""
    sigmas = chain_grid(model, steps, grid).to(windows.device, torch.float32)
    steps = len(sigmas) - 1
    rows = [{"step": k, "sigma": float(sigmas[k]), "block": int(model.partition.owner(sigmas[k:k + 1])[0]),
             "chain_bits": 0.0, "oracle_bits": 0.0, "chain_error": 0.0, "oracle_error": 0.0, "estimate_norm": 0.0}
            for k in range(steps)]
    n = 0
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size]
        g = make_generator(seed, "arlm-chain", i)

        def measure(k: int, logits: torch.Tensor, est: torch.Tensor, x: torch.Tensor = x, g: torch.Generator = g):
            eps = torch.randn(*x.shape, est.shape[-1], generator=g).to(x.device)
            _, logits_oracle = model.route(_oracle, eps, sigmas[k] * torch.ones(len(x), device=x.device), tokens=x)
            rows[k]["chain_bits"] += float(F.cross_entropy(logits[:, 1:].transpose(1, 2), x[:, 1:], reduction="sum"))
            rows[k]["oracle_bits"] += float(F.cross_entropy(logits_oracle[:, 1:].transpose(1, 2), x[:, 1:],
                                                            reduction="sum"))
            rows[k]["chain_error"] += float((logits[:, 1:].argmax(-1) != x[:, 1:]).sum())
            rows[k]["oracle_error"] += float((logits_oracle[:, 1:].argmax(-1) != x[:, 1:]).sum())
            rows[k]["estimate_norm"] += float(est[:, 1:].norm(dim=-1).sum())

        _teacher_forced_chain(model, x, sigmas, bridge, g, sampler=sampler, callback=measure)
        n += x[:, 1:].numel()
    for row in rows:
        row["chain_bits"] /= n * math.log(2)
        row["oracle_bits"] /= n * math.log(2)
        row["chain_error"] /= n
        row["oracle_error"] /= n
        row["estimate_norm"] /= n
    return rows
