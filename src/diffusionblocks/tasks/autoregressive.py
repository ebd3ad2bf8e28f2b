"""An autoregressive language model whose next-token prediction is a chain of denoising blocks (method.md
section 5, fourth row; the paper's LM1B / OpenWebText setting at small scale on characters).

Each block is a `models.arlm.ARDenoiser` of its layers: it denoises the embedding of token i, E[x_i] + sigma
eps, given the clean tokens before i, for the sigma of its range of EDM's noise axis (partition overlap
gamma 0.1 by default). Generation: for each new token, `sample.steps` denoising steps of `sample.sampler` (Euler by
default) from sigma_max down a quantile grid (default B: each block once), through the router
(`blocks.BridgedDenoiser`), the chain's estimate handed from step to step by a *bridge*
(the estimate D itself, softmax(logits) @ E, E[argmax], or E[a token drawn from the step's logits]), and the
last step's logits read out greedily or by temperature / top-p sampling. Measured on tinyshakespeare
(benchmarks/results/arlm-shakespeare), the later blocks copy what they are handed, so only the sampling bridge
keeps block 0's distribution: it is the default. A KV cache of each block's clean stream makes a token cost
one pass of one token through each block. The end-to-end baseline (`model.mode="plain"`, B=1, `compare`'s
B=1) is the same transformer trained on next-token cross-entropy.

Evaluation, on windows spread evenly over the held-out split: next-token bits per character (the baseline's
predictive distribution; for the chain, block 0 alone at sigma_max, and the chain's own next-token likelihood,
`chain_likelihood`, all blocks with the run's steps, sampler and bridge, an estimate with its standard error and
upward bias), the chain diagnostics teacher-forced on held-out text (bits of each step's
logits on the chain's own state and on the oracle E[x] + sigma eps: is the loss lost in block 0 or in the
chain?), and samples continuing held-out prompts, for each bridge: their generative perplexity under the
independent judge (`judge.py`: a larger plain LM trained on the training split, cached; `--judge RUN` another plain
run), MAUVE against held-out continuations of the same prompts on its features, distinct 2- and 4-grams, the
longest repeated run, and characters/s with and without the cache.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..blocks import BridgedDenoiser
from ..config import BlocksConfig, ConfigError, RunConfig, check_choice
from ..judge import (Judge, bounds_lines, distinct_n, features, generative_bits, judge_paragraph, longest_repeated_run,
                     mauve_bounds, mauve_table, prepare_judging, text_quality)
from ..metrics import decision_shares, shares_text
from ..models.arlm import ARDenoiser, CausalLM, KVCache, swiglu_width
from ..models.hf_llama import HFTrunk
from ..noise import BLOCK_GRID, GRID_NAMES, Partition, sigma_grid
from ..options import EvaluateOptions, SampleOptions, option
from ..precond import append_dims
from ..pretrained import from_pretrained
from ..report import equal_compute, markdown_table, memory_note, plot_loss_curves, training_cost
from ..sampling import SAMPLERS
from ..seeding import make_generator, sample_seeds
from ..text import held_out_windows, shared_windows, usable_logits
from .base import Evaluation, layers_of_denoiser
from .text import (BackboneConfig, LlamaModelConfig, TextRunConfig, TextSampleConfig, TextTask, check_pretrained_run,
                   llama_trunk_config, load_pretrained)

logger = logging.getLogger(__name__)

BRIDGES = ("estimate", "softmax", "argmax", "sample")
# How far a steered start noise moves the second step's state from a drawn token's embedding toward the scored
# one's (steered_noise): near where the block's decision turns, measured best on tinyshakespeare (0.25-0.4).
REACH = 0.3
# The line shifts of a steered start noise (steered_noise's `line` share): LINE_SHIFTS magnitudes spaced evenly up to
# LINE_REACH standard deviations along the scored token's line (tinyshakespeare's recurrent denoiser: 3 did best of
# 2, 3, 4 and 6; benchmarks/results/chain-likelihood-draws).
LINE_REACH, LINE_SHIFTS = 3.0, 12


@dataclass(frozen=True)
class ARModelConfig(BackboneConfig, LlamaModelConfig):
    """The transformer's fields (LlamaModelConfig: V at most hidden_size keeps E orthonormal; the MLP is SwiGLU of
    hidden width 2/3 * mlp_ratio * hidden_size, rounded to model.mlp_multiple) and which network it is."""

    mode: str = "diffusion"      # "diffusion" (blocks denoise each next token's embedding) or "plain" (the
                                 # end-to-end baseline: the same transformer on next-token cross-entropy, B=1).

    def validate(self) -> None:
        super().validate()
        check_choice("model.mode", self.mode, ("diffusion", "plain"))
        self.check_backbone()


@dataclass(frozen=True)
class ARSampleConfig(TextSampleConfig):
    """TextSampleConfig's steps are the denoising steps per token (0 = B, each block once); an empty prompt means
    the starts of held-out windows. The recurrent-depth task shares it (its steps: K, 0 = model.mean_recurrence)."""

    sampler: str = "euler"       # Each token's chain: a name of sampling.SAMPLERS ("euler": the paper's).
    grid: str = "quantile"       # Its noise levels: "quantile" (equal training mass, the paper's), "karras", or
                                 # "blocks" (steps / B inside each block's range, none at sigma_min; issue 28).
    bridge: str = "sample"       # What a step hands the next: "estimate" (D), "softmax" (softmax(logits) @ E),
                                 # "argmax" (E[argmax logits]) or "sample" (E[a token drawn from the logits as the
                                 # readout draws]).
    top_p: float = 1.0           # The readout of the last step's logits: nucleus (with the temperature)...
    greedy: bool = False         # ...or the argmax instead.
    new_chars: int = 200         # Characters (BPE: tokens) each sample adds to its prompt.
    prompt_chars: int = 32       # Length of the held-out prompts ("" prompt), in characters (BPE: tokens).

    def validate(self) -> None:
        super().validate()
        check_choice("sample.bridge", self.bridge, BRIDGES)
        check_choice("sample.sampler", self.sampler, tuple(SAMPLERS))
        check_choice("sample.grid", self.grid, GRID_NAMES)
        if self.new_chars < 1 or self.prompt_chars < 1:
            raise ConfigError("sample.new_chars and sample.prompt_chars must be at least 1")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sample.top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class AutoregressiveConfig(TextRunConfig):
    name: str = "shakespeare-arlm"
    task: str = "arlm"
    model: ARModelConfig = field(default_factory=ARModelConfig)
    blocks: BlocksConfig = field(default_factory=lambda: BlocksConfig(gamma=0.1))
    sample: ARSampleConfig = field(default_factory=ARSampleConfig)

    def validate(self) -> None:
        """The fields checked by section, then the rules across sections."""
        super().validate()
        if self.model.mode == "plain" and self.blocks.num_blocks != 1:
            raise ConfigError(f"model.mode='plain' is the end-to-end baseline: it needs blocks.num_blocks=1, "
                              f"got {self.blocks.num_blocks}")
        check_pretrained_run(self)
        B, steps = self.blocks.num_blocks, self.sample.steps or self.blocks.num_blocks
        if self.sample.grid == BLOCK_GRID and steps % B:
            raise ConfigError(f"sample.grid='blocks' gives each block as many steps: sample.steps={steps} is not a "
                              f"multiple of blocks.num_blocks={B}")


# ---- generation


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


def readout_settings(cfg: RunConfig, temperature: float | None = None, top_p: float | None = None,
                     greedy: bool = False) -> dict[str, Any]:
    """The readout of the run's sample section, with the options given (None: the run's) in its place."""
    s = cfg.sample
    t = s.temperature if temperature is None else temperature
    p = s.top_p if top_p is None else top_p
    dataclasses.replace(s, temperature=t, top_p=p).validate()
    return {"temperature": t, "top_p": p, "greedy": s.greedy or greedy}


def is_plain(model) -> bool:
    return isinstance(model.blocks[0], CausalLM)


def generate_text(model, cfg: RunConfig, prompts: torch.Tensor, new: int, *, bridge: str | None = None,
                  steps: int | None = None, seeds: list[int] | None = None, cache: bool = True,
                  batch_size: int = 100, num_tokens: int | None = None, sampler: str | None = None,
                  grid: str | None = None, **readout) -> torch.Tensor:
    """Either model kind, batched; readout: temperature, top_p, greedy; num_tokens: the vocabulary's size; steps,
    bridge, sampler and grid: default the run's (sample.steps 0: B)."""
    out = []
    seeds = list(range(len(prompts))) if seeds is None else seeds
    for i in range(0, len(prompts), batch_size):
        p, s = prompts[i:i + batch_size], seeds[i:i + batch_size]
        if is_plain(model):
            out.append(generate_plain(model.blocks[0], p, new, window=cfg.model.seq_len, seeds=s, cache=cache,
                                      num_tokens=num_tokens, **readout))
        else:
            out.append(generate_chain(model, p, new, window=cfg.model.seq_len, steps=steps or cfg.sample.steps or None,
                                      bridge=bridge or
                                      cfg.sample.bridge, seeds=s, cache=cache, num_tokens=num_tokens,
                                      sampler=sampler or cfg.sample.sampler, grid=grid or cfg.sample.grid,
                                      **readout))
    return torch.cat(out)


# ---- metrics


@torch.no_grad()
def next_token_bits(model, windows: torch.Tensor, *, seed: int = 0, batch_size: int = 64) -> float:
    """Held-out bits per character of each window's characters 1..L-1 given those before: the baseline's logits,
    or block 0's at sigma_max (its noisy input is almost pure noise: a predictive distribution from context)."""
    return next_token_likelihood(model, windows, seed=seed, batch_size=batch_size)["bits"]


@torch.no_grad()
def next_token_likelihood(model, windows: torch.Tensor, *, seed: int = 0, batch_size: int = 64) -> dict[str, Any]:
    """next_token_bits with its standard error over the windows (LikelihoodTally's result; one draw: no bias or
    estimator's error given). For a chain: block 0 alone at sigma_max (L/B layers), one noise draw."""
    tally = LikelihoodTally()
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size]
        if is_plain(model):
            logits = model.blocks[0](x)[:, :-1]  # position j's: the distribution of token j + 1
        else:
            blk = model.blocks[0]
            sigma = torch.full(x.shape, float(model.partition.axis.hi), device=x.device)
            eps = torch.randn(*x.shape, blk.E.shape[1], generator=make_generator(seed, "arlm-bpc", i)).to(x.device)
            logits = blk.denoise(eps * sigma[..., None], sigma, x)[1][:, 1:]  # position j's: token j's
        tally.add(logits.double().log_softmax(-1).gather(-1, x[:, 1:, None])[None, ..., 0].exp())
    return tally.result()


def _at_each_position(sigma: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
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
        return block.denoise_cached(z, _at_each_position(sigma, tokens), clean[id(block)])

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


def _denoise_each(block, z: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's (D, logits) on z at one sigma (N,) per sequence of tokens (N, L)."""
    return block.denoise(z, _at_each_position(sigma, tokens), tokens)


def _oracle(block, eps: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's (D, logits) on E[tokens] + sigma eps, the noisy input it was trained on."""
    z = block.E[tokens] + append_dims(sigma, eps.ndim) * eps
    return block.denoise(z, _at_each_position(sigma, tokens), tokens)


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


# ---- the chain's own next-token likelihood


class LikelihoodTally:
    """Running sums of a next-token likelihood estimate over windows. add(f) takes f (draws, n, T): each of `draws`
    independent unbiased estimates of q(x_j | x_<j), the probability the model gives each scored token, for n
    windows of T scored positions. q is estimated by their mean, whose -log2 is biased up (Jensen): to second order
    (the delta method) by Var(f) / (2 draws q^2 ln 2) bits, the estimator's variance Var(f) / (draws q^2 ln(2)^2).
    Both are bounded where one draw carries all of q (the sample variance of `draws` values is at most draws q^2:
    the bias at most 1 / (2 ln 2) bits a token), unlike a jackknife, whose leave-one-out means can be 0. Where the
    draws are heavy-tailed (a rare draw carries most of q) the delta method falls short; the `fall`, the same
    estimate from each half of the draws minus the one from all, measures the bias that doubling the draws removed:
    the bias left is about the fall where it shrinks as 1 / draws, more where it shrinks more slowly."""

    def __init__(self):
        self.window_bits: list[torch.Tensor] = []  # per window: its mean bits per scored token
        self.bias, self.mc_var, self.fall, self.count = 0.0, 0.0, 0.0, 0

    def add(self, f: torch.Tensor) -> None:
        f = f.double()
        M = f.shape[0]
        q = f.mean(0).clamp_min(torch.finfo(torch.float64).tiny)  # (n, T)
        self.window_bits.append((-torch.log2(q)).mean(-1).cpu())
        if M > 1:
            rel = f.var(0) / (M * q ** 2)  # (n, T): the variance of q's estimate relative to q^2, at most 1
            self.bias += float(rel.sum()) / (2 * math.log(2))
            self.mc_var += float(rel.sum()) / math.log(2) ** 2
            h = M // 2
            halves = torch.stack([f[:h].mean(0), f[h:2 * h].mean(0)]).clamp_min(torch.finfo(torch.float64).tiny)
            self.fall += float((-torch.log2(halves)).mean(0).sum() + torch.log2(q).sum())
        self.count += f[0].numel()

    def result(self, scale: float = 1.0) -> dict[str, Any]:
        """bits per token (divided by `scale`, e.g. characters per token), its standard error over the windows
        (the text's spread and the estimator's draws together), the estimator's own standard error (what remains
        on a fixed set of windows), its estimated upward bias (0 for an exact likelihood) and the fall from half
        the draws."""
        per_window = torch.cat(self.window_bits)
        W = len(per_window)
        se = float(per_window.std() / math.sqrt(W)) if W > 1 else float("nan")
        return {"bits": float(per_window.mean()) / scale, "se": se / scale,
                "se_estimator": math.sqrt(self.mc_var) / self.count / scale, "bias": self.bias / self.count / scale,
                "fall": self.fall / self.count / scale,
                "num_windows": W, "per_window": [round(float(b) / scale, 5) for b in per_window]}


def token_enumeration(p: torch.Tensor, target: torch.Tensor, top_k: int,
                      g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A token draw y ~ p (N, L, V) Rao-Blackwellised for scoring target (N, L): the top_k tokens of p and the
    target, each weighted by its probability (the target's 0 when it is among the top_k), and one token drawn from
    the rest of p weighted by the rest's mass, so that sum_r w_r f(y_r) is unbiased for E_y[f(y)] (top_k = 0: the
    target and one draw from the rest). Returns tokens and weights, (top_k + 2, N, L) each."""
    V = p.shape[-1]
    top_w, top = p.topk(min(top_k, V), dim=-1)  # (N, L, k)
    target_w = p.gather(-1, target[..., None])[..., 0] * ~(top == target[..., None]).any(-1)
    rest = p.scatter(-1, top, 0.0).scatter(-1, target[..., None], 0.0)
    mass = rest.sum(-1)  # (N, L)
    u = torch.rand(mass.shape, generator=g, dtype=torch.float64).to(p.device)
    tail = ((rest.cumsum(-1) / mass[..., None].clamp_min(1e-300)) < u[..., None]).sum(-1).clamp_max(V - 1)
    tokens = torch.cat([top.movedim(-1, 0), target[None], tail[None]])  # (k + 2, N, L)
    weights = torch.cat([top_w.movedim(-1, 0), target_w[None], mass[None]])
    return tokens, weights


def evaluation_count(sampler: str, sigmas: torch.Tensor) -> int:
    """How many denoiser evaluations `sampler` makes down sigmas (counted on a dry run of a zero denoiser)."""
    calls = []

    def zero(x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
        calls.append(sigma)
        return torch.zeros_like(x)

    SAMPLERS[sampler](zero, torch.ones(1, 1), sigmas.cpu(), disable=True)
    return len(calls)


class EnumerationTree:
    """Chains as rows (draws, R_0, ..., R_{m-1}, n): level e's R_e branches are the enumerated tokens of the draw
    after evaluation e, so rows that differ only at levels >= e are one chain up to evaluation e (computed once,
    `shared`, then `spread` back)."""

    def __init__(self, draws: int, ranks: list[int], n: int):
        self.draws, self.ranks, self.n = draws, ranks, n

    def shared(self, t: torch.Tensor, e: int) -> torch.Tensor:
        """Rows (draws * R_0 ... R_{m-1} * n, ...) -> the distinct chains before level e's draw, (draws * R_0 ...
        R_{e-1} * n, ...)."""
        if e >= len(self.ranks):
            return t
        v = t.view(self.draws, *self.ranks, self.n, *t.shape[1:])
        return v[(slice(None),) * (1 + e) + (0,) * (len(self.ranks) - e)].flatten(0, e + 1)

    def spread(self, t: torch.Tensor, e: int) -> torch.Tensor:
        """The inverse of shared for rows equal at levels >= e."""
        if e >= len(self.ranks):
            return t
        m = len(self.ranks)
        v = t.view(self.draws, *self.ranks[:e], *[1] * (m - e), self.n, *t.shape[1:])
        return v.expand(self.draws, *self.ranks, self.n, *t.shape[1:]).flatten(0, m + 1)


def scored(probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The probability each position's distribution probs (..., L, V) gives its token of x (..., L), at positions
    1..L-1 (position j's distribution is token j's: its context is the tokens before j), (..., L - 1)."""
    return probs[..., 1:, :].gather(-1, x[..., 1:, None])[..., 0]


@torch.no_grad()
def chain_likelihood(model, windows: torch.Tensor, *, steps: int | None = None, bridge: str = "sample",
                     sampler: str = "euler", grid: str = "quantile", draws: int = 8, top_k: int = 4,
                     later_k: int | None = 0, max_enumerated: int = 64, steer: float = 0.25,
                     line_steer: float = 0.0, draw_steer: float = 0.8, tolerance: float | None = None,
                     max_draws: int = 64, seed: int = 0, batch_size: int | None = None,
                     num_tokens: int | None = None) -> dict[str, Any]:
    """Held-out bits per token (positions 1..L-1) of the chain's own next-token distribution, the one its sampler
    reads the next token from: q(x) = E[softmax(last step's logits)](x) over the chain's noise and bridge draws
    (temperature 1, the context given), all blocks, `steps` steps (default B) of `sampler` down the quantile grid.

    Each token draw a later evaluation reads (with the `sample` bridge: after every evaluation but the last) is
    enumerated rather than drawn (token_enumeration: the scored token, one token drawn from the rest weighted by its
    mass, and the top_k tokens at the first draw, later_k at a later one): the later draws nearest the readout first, as
    many as keep the tree's leaves at most max_enumerated, the others drawn (later_k None: all of them drawn). q(x) =
    E_z0[ sum over the leaves of the product of their weights times the readout's q(x) ], each leaf one batched chain
    (positions are independent given the clean context), a branch's shared past computed once, each block's clean stream
    once for all of them (`denoise_cached`). Only the start noise is drawn, `draws` times, a `steer` share of them
    toward the scored token at a step's reach and a `line_steer` share along its line, weighted back (steered_noise).
    Why: a later block mostly keeps the token handed to it, so a drawn later token makes a chain's readout nearly 0 or
    1, and a rare start noise under which a later block turns another token into the scored one carries much of a poorly
    predicted token's probability: either makes -log2 of a mean of few draws far too high
    (benchmarks/results/chain-likelihood-draws). Where the tree leaves later draws drawn (many steps), a `draw_steer`
    share of the chains takes the scored token at one of them, or from one of them on, and is weighted back
    (SteeredDraws): with many steps the early states are mostly noise and the decision falls on the drawn levels, where
    a chain that turns to the scored token is rare under the blocks' own draws and carries a poorly predicted token's
    probability in the same way.

    The estimate of q is unbiased; its -log2 is biased up: in expectation an upper bound on the chain's bits, the
    bias estimated (LikelihoodTally: the delta method, and the fall from half the draws). tolerance: the draws are
    doubled (the new ones independent of the old) while that fall is above this many bits per token, up to
    max_draws. batch_size: chains per forward pass (at the widest level; None: 256 on a CPU, 8192 elsewhere; a
    batch's draws come from one generator, so another batch size gives other draws); num_tokens: the vocabulary's
    size, when the model has more ids (never drawn)."""
    if (draws < 2 or top_k < 0 or (later_k or 0) < 0 or max_draws < draws or min(steer, line_steer) < 0
            or steer + line_steer >= 1 or not 0 <= draw_steer < 1):
        raise ConfigError(f"the chain likelihood needs at least 2 draws (their spread gives its error and bias), "
                          f"top_k, later_k >= 0, max_draws >= draws, steer, line_steer >= 0 with steer + line_steer "
                          f"< 1 and 0 <= draw_steer < 1, got {draws}, {top_k}, {later_k}, {max_draws}, {steer}, "
                          f"{line_steer} and {draw_steer}")
    sigmas = chain_grid(model, steps, grid).to(windows.device, torch.float32)
    batch_size = batch_size or (256 if windows.device.type == "cpu" else 8192)
    read = evaluation_count(sampler, sigmas) - 1 if bridge == "sample" else 0  # the draws a later step reads
    ranks = [top_k + 2] + [1] * (read - 1) if read else []  # 1: drawn
    for e in range(read - 1, 0, -1):  # the later draws, nearest the readout first
        if later_k is None or math.prod(ranks) * (later_k + 2) > max_enumerated:
            break
        ranks[e] = later_k + 2
    chains = dict(sigmas=sigmas, bridge=bridge, sampler=sampler, ranks=ranks, seed=seed, batch_size=batch_size,
                  num_tokens=num_tokens, steer=steer, line_steer=line_steer, draw_steer=draw_steer)
    f = _chain_draws(model, windows, draws, 0, **chains)  # (draws, W, L - 1)
    result = _tally(f).result()
    while tolerance is not None and result["fall"] > tolerance and 2 * len(f) <= max_draws:
        f = torch.cat([f, _chain_draws(model, windows, len(f), len(f), **chains)])
        result = _tally(f).result()
    return {**result, "steps": len(sigmas) - 1, "bridge": bridge, "sampler": sampler, "draws": len(f),
            "top_k": top_k if ranks else None, "later_k": later_k if read > 1 else None,
            "enumerated": math.prod(ranks), "drawn_later": ranks.count(1), "steer": steer, "tolerance": tolerance,
            **({"line_steer": line_steer} if line_steer else {}),
            **({"draw_steer": draw_steer} if 1 in ranks else {})}  # only where a later draw is drawn


def _tally(f: torch.Tensor) -> LikelihoodTally:
    """A LikelihoodTally of estimates f (draws, windows, T)."""
    tally = LikelihoodTally()
    tally.add(f)
    return tally


def steered_noise(model, x: torch.Tensor, sigmas: torch.Tensor, draws: int, g: torch.Generator, steer: float,
                  num_tokens: int | None, line: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Start noises eps (draws, n, L, D) drawn from a mixture that steers the chain toward each scored token, and
    their importance weights N(eps; 0, I) / mixture(eps) (draws, n, L). With probability 1 - steer - line, eps ~
    N(0, I). With probability steer, a later step k is chosen (its share below) and a token v other than the scored x
    with probability p(v) / (1 - p(x)) (p: the first block's distribution at z = 0), and eps ~ N(mu_kv, I) with
    mu_kv = REACH (E[x] - E[v]) (1 - sigma_k / sigma_0) / sigma_k: the shift that moves step k's state a REACH of the
    way from E[v] toward E[x] (its noise is sigma_k eps beside (1 - sigma_k / sigma_0) E[the tokens drawn], Euler's
    steps from sigma_0). With probability line, eps ~ N(a u, I), u the unit vector along E[x] - sum_v p(v) E[v] / (1 -
    p(x)) (v != x) and a one of LINE_SHIFTS magnitudes up to LINE_REACH alike: x ahead of every other token at once,
    by a margin that suits whichever step decides (a chain of many steps decides at a sigma no single reach fits).
    A noise under which a later block turns a drawn v into x is rare under N(0, I) and carries much of a poorly
    predicted token's probability; the weight (at most 1 / (1 - steer - line)) keeps the estimate of q unbiased
    whatever the shifts. Step k's share falls with how rare a noise of its reach is, exp(-|mu|^2 / 8) at a typical
    |E[x] - E[v]|: the last steps' small sigmas get none."""
    n, L = x.shape
    _, logits = model.route(_denoise_each, torch.zeros(n, L, model.blocks[0].E.shape[1], device=x.device),
                            sigmas[0] * torch.ones(n, device=x.device), tokens=x)
    p = usable_logits(logits, num_tokens).double().softmax(-1)  # (n, L, V)
    E = model.blocks[0].E.double()[:p.shape[-1]]  # (V, D)
    others = p.scatter(-1, x[..., None], 0.0)
    others = others / others.sum(-1, keepdim=True).clamp_min(1e-300)
    mu, log_pi = [], [torch.full((n, L, 1), math.log1p(-steer - line), dtype=torch.float64, device=x.device)]
    if steer > 0:
        sigma0, later = sigmas[0].double(), sigmas[1:][sigmas[1:] > 0].double()
        reach = REACH * (1 - later / sigma0) / later  # (K,): eps per unit of E[x] - E[v] at each later step
        typical = math.sqrt(2) * float(E.pow(2).sum(-1).mean().sqrt())
        share = torch.exp(-(reach * typical) ** 2 / 8)
        keep = share > 1e-3 * share.max()
        reach, share = reach[keep], share[keep] / share[keep].sum()
        mu_kv = reach[:, None, None, None, None] * (E[x][..., None, :] - E)  # (K, n, L, V, D)
        mu.append(mu_kv.permute(1, 2, 0, 3, 4).flatten(2, 3))  # (n, L, K V, D): step-major
        log_pi.append((math.log(steer) + share.log()[:, None] + others.log()[..., None, :]).flatten(2))  # (n, L, K V)
    if line > 0:
        toward = F.normalize(E[x] - others @ E, dim=-1)  # (n, L, D): from the others' mean to x
        a = torch.arange(1, LINE_SHIFTS + 1, dtype=torch.float64, device=x.device) * (LINE_REACH / LINE_SHIFTS)
        mu.append(a[:, None] * toward[..., None, :])  # (n, L, LINE_SHIFTS, D)
        log_pi.append(torch.full((n, L, LINE_SHIFTS), math.log(line / LINE_SHIFTS), dtype=torch.float64,
                                 device=x.device))
    mu, log_pi = torch.cat(mu, 2), torch.cat(log_pi, -1)  # (n, L, C, D), (n, L, 1 + C): unshifted, then each shift
    u = torch.rand(draws, n, L, generator=g, dtype=torch.float64).to(x.device)
    component = (log_pi.exp().cumsum(-1) < u[..., None]).sum(-1).clamp_max(mu.shape[2])  # (draws, n, L)
    shift = torch.cat([torch.zeros(n, L, 1, E.shape[1], dtype=torch.float64, device=x.device), mu], 2)
    shift = shift.expand(draws, -1, -1, -1, -1).gather(3, component[..., None, None].expand(-1, -1, -1, 1, E.shape[1]))
    eps = torch.randn(draws, n, L, E.shape[1], generator=g, dtype=torch.float64).to(x.device) + shift[..., 0, :]
    log_terms = log_pi[None, ..., 1:] + torch.einsum("anld,nlcd->anlc", eps, mu) - (mu ** 2).sum(-1) / 2
    log_mixture = torch.logsumexp(torch.cat([log_pi[None, ..., :1].expand(draws, -1, -1, -1), log_terms], -1), -1)
    return eps.float(), (-log_mixture).exp()


def _chain_draws(model, windows: torch.Tensor, draws: int, first: int, *, sigmas: torch.Tensor, bridge: str,
                 sampler: str, ranks: list[int], seed: int, batch_size: int,
                 num_tokens: int | None, steer: float = 0.0, line_steer: float = 0.0,
                 draw_steer: float = 0.0) -> torch.Tensor:
    """chain_likelihood's `draws` unbiased estimates of q(x_j | x_<j), (draws, W, L - 1), on enumeration trees of
    `ranks` (level e's branches; 1: its token drawn); `first`: how many were drawn before (the generators of later
    draws are new ones)."""
    levels, leaves = len(ranks), math.prod(ranks)
    D_dim = model.blocks[0].E.shape[1]
    per_batch = max(batch_size // (draws * leaves), 1)  # windows per batch
    out = []
    for i in range(0, len(windows), per_batch):
        x = windows[i:i + per_batch]
        n, L = x.shape
        tree = EnumerationTree(draws, ranks, n)
        g = make_generator(seed, "arlm-chain-likelihood", i, *([first] if first else []))
        xs = x.expand(draws * leaves, n, L).reshape(-1, L)  # (draws * leaves * n, L): draw, ranks, window
        state = {"calls": 0, "weights": torch.ones(draws * leaves * n, L, dtype=torch.float64, device=x.device)}
        clean: dict[int, KVCache] = {}  # each block's clean stream of these windows, run once for every chain

        def denoise(block, z: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor):
            e = state["calls"]
            z, sigma, tokens = (tree.shared(t, e) for t in (z, sigma, tokens))
            if id(block) not in clean:
                clean[id(block)] = block.clean_cache(x)
            D, logits = block.denoise_cached(z, _at_each_position(sigma, tokens), clean[id(block)])
            return tree.spread(D, e), tree.spread(usable_logits(logits, num_tokens), e)

        def carry(block, D: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            e, state["calls"] = state["calls"], state["calls"] + 1
            if bridge != "sample":
                return block.estimate(D, logits, bridge)
            if e < levels:
                shared = tree.shared(logits, e)  # (draws * R_0 ... R_{e-1} * n, L, V)
                if ranks[e] == 1 and draw_steer > 0:
                    tokens, weights = steered.draw(e, shared, tree.shared(xs, e))
                elif ranks[e] == 1:
                    u = torch.rand(shared.shape[:-1], generator=g, dtype=torch.float64).to(x.device).flatten()
                    tokens = draw_token(shared.flatten(0, 1), 1.0, 1.0, False, u).view(1, *shared.shape[:-1])
                    weights = torch.ones(tokens.shape, dtype=torch.float64, device=x.device)
                else:
                    tokens, weights = token_enumeration(shared.double().softmax(-1), tree.shared(xs, e),
                                                        ranks[e] - 2, g)  # (R_e, rows, L)
                # Branch r of a row goes to level e's rank r: (R_e, draws, R_<e, n, L) -> (draws, R_<e, R_e, n, L).
                tokens, weights = (t.unflatten(1, (-1, n)).movedim(0, 1).flatten(0, 2) for t in (tokens, weights))
                state["weights"] = state["weights"] * tree.spread(weights, e + 1)
                return block.estimate(D, logits, bridge, tree.spread(tokens, e + 1))
            u = torch.rand(logits.shape[:-1], generator=g, dtype=torch.float64).to(x.device).flatten()
            return block.estimate(D, logits, bridge, draw_token(logits.flatten(0, 1), 1.0, 1.0, False, u).view(
                logits.shape[:-1]))

        chain = BridgedDenoiser(model, carry, denoise)
        steered = SteeredDraws([e for e, r in enumerate(ranks) if r == 1], draw_steer, g)
        if steer + line_steer > 0 and len(sigmas) > 2:
            eps, w = steered_noise(model, x, sigmas, draws, g, steer, num_tokens, line_steer)
            state["weights"] = state["weights"] * tree.spread(w.flatten(0, 1), 0)
        else:
            eps = torch.randn(draws, n, L, D_dim, generator=g).to(x.device)
        z = tree.spread(eps.flatten(0, 1), 0) * sigmas[0]  # every leaf of a draw starts from its noise
        SAMPLERS[sampler](chain, z, sigmas, extra_args={"tokens": xs}, disable=True)
        f = scored(chain.logits.double().softmax(-1), xs) * state["weights"][:, 1:]  # (draws * leaves * n, L - 1)
        out.append(f.view(draws, leaves, n, L - 1).sum(1))
    return torch.cat(out, 1)


class SteeredDraws:
    """The drawn levels of a chain's token draws (`levels`, consecutive, m of them), drawn from a mixture that puts
    the scored token x on the path and weighted back: with probability 1 - steer every level draws from the block's
    distribution p_k; otherwise, with probability steer / (2 m) each, level k alone takes x, or every level from k on
    takes x (the decision for x made at k and handed on), the other levels drawing from p_k. The mixture's density of
    a path is p(path) ((1 - steer) + steer / (2 m) sum_k (r_k + prod_{j >= k} r_j)), r_k = [y_k = x] / p_k(x), so
    the path's weight, its inverse, is at most 1 / (1 - steer) and keeps the chain's estimate unbiased. One choice
    per chain and position (the chains are the rows the drawn levels share)."""

    def __init__(self, levels: list[int], steer: float, g: torch.Generator):
        self.levels, self.steer, self.g = levels, steer, g
        self.first: torch.Tensor | None = None  # (rows, L): the first level index that takes x (m: none)
        self.only: torch.Tensor | None = None  # (rows, L): whether that level alone takes x
        self.log_r: list[torch.Tensor] = []  # log r_k of the levels drawn so far, (rows, L) each

    def draw(self, e: int, logits: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Level e's tokens and weights (1, rows, L) from the block's logits (rows, L, V) at the scored tokens x (rows,
        L); the weights are 1 but at the last level, which carries the path's weight."""
        m, i = len(self.levels), self.levels.index(e)
        if i == 0:
            u = torch.rand(x.shape, generator=self.g, dtype=torch.float64).to(x.device)
            pick = (u / self.steer * 2 * m).long().clamp_max(2 * m - 1)  # uniform over (level, kind) where u < steer
            self.first = torch.where(u < self.steer, pick % m, m)
            self.only, self.log_r = pick < m, []
        u = torch.rand(x.shape, generator=self.g, dtype=torch.float64).to(x.device).flatten()
        y = draw_token(logits.flatten(0, 1), 1.0, 1.0, False, u).view(x.shape)
        y = torch.where((self.first == i) | ((self.first < i) & ~self.only), x, y)
        log_p_x = logits.double().log_softmax(-1).gather(-1, x[..., None])[..., 0]  # (rows, L)
        self.log_r.append(torch.where(y == x, -log_p_x, -math.inf))
        if i < m - 1:
            return y[None], torch.ones(1, *x.shape, dtype=torch.float64, device=x.device)
        log_r = torch.stack(self.log_r)  # (m, rows, L)
        log_from = log_r.flip(0).cumsum(0)  # log prod_{j >= k} r_j for k = m - 1, ..., 0
        log_sum = torch.logsumexp(torch.cat([log_r, log_from]), 0)  # log sum_k (r_k + prod_{j >= k} r_j)
        return y[None], (1 / ((1 - self.steer) + self.steer / (2 * m) * log_sum.exp()))[None]


@torch.no_grad()
def judge_bits(judge, texts: torch.Tensor, prompt_len: int, window: int, batch_size: int = 50) -> float:
    """Bits per character of the continuations (texts (N, T) after their first prompt_len >= 1 tokens) under a
    plain model (a CausalLM) of context `window`: `judge.generative_bits`."""
    return generative_bits(Judge(judge, window), texts, prompt_len, batch_size)


# ---- the task


@dataclass(frozen=True)
class ARSampleOptions(SampleOptions):
    prompt: str | None = option(None, "prompt of every sample (default: the run's sample.prompt, or held-out prompts)")
    new: int | None = option(None, "characters to add (default: the run's sample.new_chars)")
    bridge: str | None = option(None, "what each denoising step hands the next (default: the run's sample.bridge)",
                                choices=BRIDGES)
    steps: int | None = option(None, "denoising steps per token (default: sample.steps, or B)")
    sampler: str | None = option(None, "default: the run's sample.sampler", choices=tuple(SAMPLERS))
    temperature: float | None = option(None, "default: the run's sample.temperature")
    top_p: float | None = option(None, "default: the run's sample.top_p")
    greedy: bool = option(False, "argmax readout")
    cache: bool = option(True, "recompute the context at every step")


@dataclass(frozen=True)
class ChainLikelihoodOptions(EvaluateOptions):
    """How `evaluate` estimates a chain's own next-token likelihood (chain_likelihood)."""

    chain_draws: int = option(8, "start-noise draws per window of the chain likelihood (at least 2)")
    top_k: int = option(4, "tokens of the chain's first draw enumerated for its likelihood (besides the scored one "
                        "and one drawn from the rest)")
    later_k: int = option(0, "the same for each later draw (the last draws first, up to --max-enumerated chains)")
    max_enumerated: int = option(64, "enumerated chains per start noise at most")
    steer: float = option(0.25, "share of the chain likelihood's start noises steered toward the scored token (a "
                          "step's reach from another token) and weighted back (0: none)")
    line_steer: float = option(0.0, "share of its start noises shifted along the scored token's line (magnitudes up "
                               "to 3 standard deviations; chains of many steps) and weighted back (0: none)")
    draw_steer: float = option(0.8, "share of the chains that take the scored token at, or from, one of the later "
                               "draws the likelihood's tree leaves drawn (many steps), weighted back (0: none)")
    tolerance: float = option(0.01, "the chain likelihood's draws are doubled while the fall of its estimate from "
                              "half of them is above this many bits per character (0: never)")
    max_draws: int = option(32, "the draws are doubled up to this many")
    chain_batch: int = option(0, "chains per forward pass of the chain likelihood at its widest level (0: 256 on a "
                              "CPU, 8192 on an accelerator, whose kernels want wide batches)")

    def check_chain(self) -> None:
        """These options follow their rules (checked before any work)."""
        if (self.chain_draws < 2 or min(self.top_k, self.later_k, self.chain_batch) < 0 or self.max_enumerated < 1
                or self.tolerance < 0 or min(self.steer, self.line_steer) < 0 or self.steer + self.line_steer >= 1
                or not 0 <= self.draw_steer < 1):
            raise ConfigError(f"--chain-draws must be at least 2, --top-k, --later-k and --chain-batch at least 0, "
                              f"--max-enumerated at least 1, --tolerance at least 0, --steer and --line-steer at "
                              f"least 0 with a sum below 1 and --draw-steer in [0, 1), got {self.chain_draws}, "
                              f"{self.top_k}, {self.later_k}, {self.chain_batch}, {self.max_enumerated}, "
                              f"{self.tolerance}, {self.steer}, {self.line_steer} and {self.draw_steer}")

    def chain_kwargs(self, chars_per_token: float) -> dict[str, Any]:
        """chain_likelihood's keywords for these options."""
        return dict(draws=self.chain_draws, top_k=self.top_k, later_k=self.later_k,
                    max_enumerated=self.max_enumerated, steer=self.steer, line_steer=self.line_steer,
                    draw_steer=self.draw_steer,
                    tolerance=self.tolerance * chars_per_token or None,
                    max_draws=max(self.max_draws, self.chain_draws), seed=self.seed,
                    batch_size=self.chain_batch or None)


@dataclass(frozen=True)
class AREvaluateOptions(ChainLikelihoodOptions):
    judge: str = option("auto", "what scores the samples (generative perplexity, MAUVE's features): auto = the "
                        "independent judge of the run's data, cached under --cache-dir/judges and trained first if "
                        "missing; none; or a plain run (task arlm, model.mode=plain) with the run's vocabulary")
    prompts: int = option(100, "held-out prompts continued")
    new: int = option(200, "characters added to each prompt")
    bridges: str = option(",".join(BRIDGES), "bridges measured (chain runs)")
    windows: int = option(2048, "held-out windows for the bits, spread evenly over the split (all of them where there "
                          "are fewer; 0 = all): the chain likelihood's standard error falls as 1 / sqrt(windows)")
    speed_prompts: int = option(8, "prompts timed with and without the cache")
    mauve_prompts: int = option(500, "held-out prompts continued for MAUVE against their held-out continuations "
                                "(0: no MAUVE)")
    mauve_new: int = option(128, "characters each MAUVE continuation adds")


class AutoregressiveTask(TextTask):
    name = "arlm"
    config_class = AutoregressiveConfig
    sample_suffixes = (".txt",)
    sample_options = ARSampleOptions
    evaluate_options = AREvaluateOptions

    def comparison_config(self, cfg: RunConfig) -> RunConfig:
        """B=1: the plain causal transformer with the same layers; B>1: denoising blocks."""
        mode = "plain" if cfg.blocks.num_blocks == 1 else "diffusion"
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mode=mode))

    def remaining_measure(self, cfg: RunConfig) -> str | None:
        """Each position's held-out cross-entropy at each noise level (the plain LM has no noise axis)."""
        return "cross-entropy" if cfg.model.mode == "diffusion" else None

    def build_block(self, cfg: RunConfig, b: int, generator: torch.Generator | None = None):
        m = cfg.model
        size = dict(hidden_size=m.hidden_size, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                    mlp_multiple=m.mlp_multiple)
        trunk = None
        if m.backbone == "transformers":  # transformers' Llama layers, 2 L positions: [noisy ; clean]
            config = llama_trunk_config(cfg, b, m.vocab_size, swiglu_width(m.hidden_size, m.mlp_ratio, m.mlp_multiple),
                                        2 * m.seq_len)
            trunk = HFTrunk(config, m.vocab_size)
        if m.mode == "plain":
            net = CausalLM(m.vocab_size, depth=m.depth, trunk=trunk, **size)
            net.initialize_weights(generator)
            if trunk is not None:
                net.norm_final.eps = trunk.layers[0].layer.input_layernorm.variance_epsilon
            self.load_pretrained(cfg, b, net, generator, "norm_final.weight")
            return net
        lo, hi = self.partition(cfg).training_range(b)
        net = self.with_run_table(ARDenoiser(m.vocab_size, depth=cfg.layer_split()[b], sigma_data=cfg.noise.sigma_data,
                                             sigma_min=lo, sigma_max=hi, trunk=trunk, **size), cfg, generator)
        self.load_pretrained(cfg, b, net, generator, "norm_out.weight")
        return net

    def load_pretrained(self, cfg: RunConfig, b: int, net: torch.nn.Module, generator: torch.Generator | None,
                        norm: str) -> None:
        """A fresh block (built with a generator) of an end-to-end run with model.pretrained starts from its weights
        (the final norm into `norm`; the head of a denoiser reads its normalised estimate)."""
        if cfg.model.pretrained and generator is not None and cfg.blocks.num_blocks == 1:
            load_pretrained(cfg, b, net, "trunk", norm, "head.weight")

    def split_weights(self, cfg: RunConfig, weights: dict[str, torch.Tensor], first: int,
                      last: int) -> dict[str, torch.Tensor]:
        """Llama layers [first, last) of the [noisy ; clean] denoiser and copies of the rest; a plain LM is refused."""
        return layers_of_denoiser(cfg, weights, first, last, "causal LM")

    def loss_inputs(self, cfg: RunConfig, partition: Partition, b: int, batch: torch.Tensor,
                    generator: torch.Generator) -> dict[str, Any]:
        """A noise level per position (noisy positions see only themselves and the clean prefix, so each is an
        independent denoising problem) and its Gaussian noise."""
        if cfg.model.mode == "plain":
            return {"tokens": batch}
        N, L = batch.shape
        at = generator.device  # every draw where the generator is (the device, when the data is resident there)
        sigma = partition.sample(b, N * L, generator=generator, device=at).float().view(N, L)
        return {"tokens": batch, "sigma": sigma,
                "noise": torch.randn(N, L, cfg.model.hidden_size, generator=generator, device=at)}

    # ---- inference

    def draw_samples(self, model, cfg: RunConfig, run_dir: Path, device: torch.device) -> list[str]:
        """sample.num continuations (of sample.prompt, or of held-out prompts)."""
        s = cfg.sample
        vocab = self.run_vocabulary(run_dir)
        prompts = self.prompts(cfg, run_dir, s.num, s.prompt, s.prompt_chars).to(device)
        ids = generate_text(model, cfg, prompts, s.new_chars, seeds=sample_seeds(cfg.train.seed, s.num),
                            num_tokens=len(vocab), temperature=s.temperature, top_p=s.top_p, greedy=s.greedy)
        return [vocab.decode(row) for row in ids.cpu()]

    def sample(self, run_dir: Path, model, cfg: RunConfig, options: ARSampleOptions) -> None:
        """A .txt file, one sample per paragraph; the first few are printed, and the speed logged."""
        s = cfg.sample
        new = s.new_chars if options.new is None else options.new
        if new < 1 or (options.steps is not None and options.steps < 0):
            raise ConfigError("--new must be at least 1 and --steps at least 0")
        vocab = self.run_vocabulary(run_dir)
        prompts = self.prompts(cfg, run_dir, options.num, s.prompt if options.prompt is None else options.prompt,
                               s.prompt_chars).to(options.device)
        readout = readout_settings(cfg, options.temperature, options.top_p, options.greedy)
        t0 = time.perf_counter()
        ids = generate_text(model, cfg, prompts, new, bridge=options.bridge, steps=options.steps or s.steps or None,
                            seeds=sample_seeds(options.seed, options.num), cache=options.cache,
                            num_tokens=len(vocab), sampler=options.sampler, **readout)
        seconds = time.perf_counter() - t0
        texts = [vocab.decode(row) for row in ids.cpu()]
        self.write_samples(options.out, texts, show=3)
        logger.info("%d characters in %.2f s (%.0f characters/s)", options.num * new, seconds,
                    options.num * new / seconds)

    def evaluate(self, run_dir: Path, options: AREvaluateOptions) -> Evaluation:
        model, cfg = from_pretrained(run_dir, options.device)
        bridges = [b for b in options.bridges.split(",") if b]
        for b in bridges:
            check_choice("--bridges", b, BRIDGES)
        for name in ("prompts", "new", "speed_prompts"):
            if getattr(options, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(options, name)}")
        check_windows(options.windows)
        options.check_chain()
        if options.mauve_prompts < 0 or options.mauve_new < 1:
            raise ConfigError("--mauve-prompts must be at least 0 and --mauve-new at least 1")
        data = self.load_run_data(cfg, run_dir)
        prompts = self.held_out_prompts(data.test, options.prompts, cfg.sample.prompt_chars,
                                        ("--prompts", "sample.prompt_chars")).to(options.device)
        P = cfg.sample.prompt_chars
        judge, judge_info, reference = prepare_judging(options.judge, cfg, run_dir, data.test,
                                                       mauve_prompts=options.mauve_prompts, prompt_len=P,
                                                       new=options.mauve_new, cache_dir=options.cache_dir,
                                                       device=options.device, progress=options.progress)
        mauve_on = reference is not None
        windows = evaluation_windows(data.test, cfg.model.seq_len, options.windows).to(options.device)
        first = next_token_likelihood(model, windows, seed=options.seed)
        r: dict[str, Any] = {"run": str(run_dir), "num_blocks": cfg.blocks.num_blocks, "mode": cfg.model.mode,
                             "num_windows": len(windows), "seq_len": cfg.model.seq_len,
                             "bits_per_token": first["bits"], "chars_per_token": data.test.chars_per_token}
        r["bpc"] = r["bits_per_token"] / r["chars_per_token"]
        r["bpc_se"] = first["se"] / r["chars_per_token"]
        r["bpc_per_window"] = first["per_window"]  # bits per token, as the likelihoods' per_window
        r["bpc_label"] = "next-token cross-entropy" if is_plain(model) else (
            f"block 0 at sigma_max ({cfg.layer_split()[0]} of {cfg.model.depth} layers)")
        if is_plain(model):  # the exact likelihood: no chain, no estimate
            r["chain_likelihood"] = {**per_character(first, r["chars_per_token"]), "label": r["bpc_label"]}
        else:
            s = cfg.sample
            steps = s.steps or cfg.blocks.num_blocks
            chain = chain_likelihood(model, windows, steps=steps, bridge=s.bridge, sampler=s.sampler, grid=s.grid,
                                     num_tokens=len(data.vocab), **options.chain_kwargs(data.test.chars_per_token))
            r["chain_likelihood"] = {**per_character(chain, r["chars_per_token"]), "label": (
                f"chain likelihood (all {cfg.blocks.num_blocks} blocks, {steps} {s.sampler} steps on the {s.grid} "
                f"grid, bridge {s.bridge})")}
            r["chain"] = {b: chain_bits(model, windows, bridge=b, steps=steps, seed=options.seed, sampler=s.sampler,
                                        grid=s.grid) for b in bridges}
            if s.bridge in r["chain"]:  # who decides, along the run's own chain and on each step's oracle input
                rows, chance = r["chain"][s.bridge], 1 - 1 / len(data.vocab)
                owners = [row["block"] for row in rows]
                r["decision"] = {"bridge": s.bridge, "chance_error": chance,
                                 "chain": decision_shares(chance, [row["chain_error"] for row in rows], owners),
                                 "oracle": decision_shares(chance, [row["oracle_error"] for row in rows], owners)}
        readout = readout_settings(cfg)
        vocab = data.vocab
        if judge is not None:
            r["judge"] = judge_info
        if mauve_on:
            reference_features = features(judge, reference, P)
            r["judge"]["bounds"] = mauve_bounds(judge, data, options.mauve_prompts, P, options.mauve_new,
                                                seed=options.seed, reference_features=reference_features)
        r["samples"], ids_of = {}, {}
        for bridge in ([None] if is_plain(model) else bridges):
            seeds = sample_seeds(options.seed, len(prompts))
            t0 = time.perf_counter()
            ids = generate_text(model, cfg, prompts, options.new, bridge=bridge, seeds=seeds, num_tokens=len(vocab),
                                **readout)
            seconds = time.perf_counter() - t0
            k = min(options.speed_prompts, len(prompts))
            t0 = time.perf_counter()
            slow = generate_text(model, cfg, prompts[:k], options.new, bridge=bridge, seeds=seeds[:k], cache=False,
                                 num_tokens=len(vocab), **readout)
            slow_s = time.perf_counter() - t0
            texts = [vocab.decode(row[prompts.shape[1]:]) for row in ids.cpu()]
            entry = {"chars_per_s": len(prompts) * options.new / seconds, "chars_per_s_no_cache": k * options.new / slow_s,
                     "cache_equals_no_cache": bool(torch.equal(slow, ids[:k])),
                     "distinct_2": distinct_n(texts, 2), "distinct_4": distinct_n(texts, 4),
                     "longest_run_mean": sum(map(longest_repeated_run, texts)) / len(texts),
                     "longest_run_max": max(map(longest_repeated_run, texts)),
                     "prompts": [vocab.decode(p) for p in prompts[:4].cpu()], "texts": texts}
            if judge is not None:
                entry["gen_bits"] = generative_bits(judge, ids, prompts.shape[1]) / data.test.chars_per_token
                entry["gen_ppl"] = 2 ** entry["gen_bits"]
            if mauve_on:
                generated = generate_text(model, cfg, reference[:, :P].to(options.device), options.mauve_new,
                                          bridge=bridge, seeds=sample_seeds(options.seed, len(reference)),
                                          num_tokens=len(vocab), **readout)
                entry["mauve"] = text_quality(judge, generated.cpu(), reference, P, seed=options.seed,
                                              reference_features=reference_features,
                                              chars_per_token=data.test.chars_per_token)
            r["samples"][bridge or "plain"] = entry
            ids_of[bridge or "plain"] = ids.cpu()
        r.update({"num_prompts": len(prompts), "prompt_chars": prompts.shape[1], "new_chars": options.new,
                  "readout": readout})
        return Evaluation(r, ids_of)

    def evaluation_name(self, cfg: RunConfig, options: AREvaluateOptions) -> str:
        return f"eval-p{options.prompts}-n{options.new}-seed{options.seed}"

    def format_evaluation(self, r: dict[str, Any]) -> str:
        lines = [f"{r['run']}: B={r['num_blocks']} ({r['mode']}), held-out next-token BPC {r['bpc']:.4f} "
                 f"({r['num_windows']} windows of {r['seq_len']})"]
        if "judge" in r:
            lines += bounds_lines(r["judge"])
        if "chain_likelihood" in r:
            c = r["chain_likelihood"]
            lines[0] += f" +- {r.get('bpc_se', float('nan')):.4f}: {r.get('bpc_label', '')}"
            if "draws" not in c:  # the plain model's own likelihood: exact, its error the windows' alone
                lines.append(f"  {c['label']}: BPC {c['bpc']:.4f} +- {c['bpc_se']:.4f} (exact: no chain, no draws)")
            else:
                lines.append(f"  {c['label']}: BPC {c['bpc']:.4f} +- {c['bpc_se']:.4f} (estimator alone +- "
                             f"{c['bpc_se_estimator']:.4f}; an upper bound, biased up by about {c['bpc_bias']:.4f} by "
                             f"the delta method, {bias_cell(c)} below half the draws' estimate)")
        for name, s in r["samples"].items():
            ppl = f"gen. perplexity {s['gen_ppl']:.2f}, " if "gen_ppl" in s else ""
            if "mauve" in s:
                ppl += f"MAUVE {s['mauve']['mauve']:.3f}, "
            lines.append(f"  {name}: {ppl}distinct-2 {s['distinct_2']:.3f}, distinct-4 {s['distinct_4']:.3f}, longest "
                         f"run {s['longest_run_mean']:.1f} (max {s['longest_run_max']}), {s['chars_per_s']:.0f} chars/s "
                         f"({s['chars_per_s_no_cache']:.0f} without the cache)")
            lines.append("    " + (s["prompts"][0] + "|" + s["texts"][0])[:160].replace("\n", "\n    "))
        if "decision" in r:
            d = r["decision"]
            lines.append(f"  who decides (each block's share of the top-1 error its steps remove from chance's "
                         f"{d['chance_error']:.3f}; bridge {d['bridge']}): along the chain {shares_text(d['chain'])}; "
                         f"on the oracle input {shares_text(d['oracle'])}")
        for bridge, rows in r.get("chain", {}).items():
            lines.append(f"  chain ({bridge}): " + ", ".join(
                f"step {row['step']} (block {row['block']}) {row['chain_bits']:.3f} bits vs oracle "
                f"{row['oracle_bits']:.3f}" for row in rows))
        return "\n".join(lines)

    def write_evaluation(self, out_dir: Path, cfg: RunConfig, evaluation: Evaluation) -> None:
        for name, s in evaluation.result["samples"].items():
            (out_dir / f"samples-{name}.txt").write_text("\n\n".join(s["texts"]) + "\n", encoding="utf-8")

    def write_comparison(self, out_dir: Path, configs: dict[int, RunConfig], results: dict[int, dict[str, Any]],
                         artifacts: dict[int, Any]) -> None:
        write_arlm_report(out_dir, configs, results, artifacts)


def evaluation_windows(test, seq_len: int, num: int) -> torch.Tensor:
    """The windows the bits are measured on: `num` spread evenly over the held-out split (shared_windows), 0 = all."""
    return shared_windows(test, seq_len, num) if num else held_out_windows(test, seq_len)


def per_character(r: dict[str, Any], chars_per_token: float) -> dict[str, Any]:
    """A LikelihoodTally result with its figures per character added (bpc, bpc_se, bpc_se_estimator, bpc_bias)."""
    names = {"bits": "bpc", "se": "bpc_se", "se_estimator": "bpc_se_estimator", "bias": "bpc_bias",
             "fall": "bpc_fall"}
    return {**r, **{name: r[k] / chars_per_token for k, name in names.items()}}


def chain_bpc_cell(cfg: RunConfig, r: dict[str, Any], readout: str) -> str:
    """The chain likelihood's cell of compare's row of `readout` (a bridge, or "plain"): on the run's own bridge."""
    c = r.get("chain_likelihood")
    if c is None or readout not in ("plain", cfg.sample.bridge):
        return "-"
    return f"{c['bpc']:.4f} +- {c['bpc_se']:.4f}"


def bias_cell(c: dict[str, Any]) -> str:
    """A chain likelihood's upward bias, "delta method / fall from half the draws" per character."""
    return f"{c['bpc_bias']:.4f} / {c['bpc_fall']:.4f}" if "bpc_fall" in c else f"{c['bpc_bias']:.4f} / -"


def likelihood_rows(r: dict[str, Any]) -> list[tuple]:
    """(what, BPC, SE, estimator SE, bias, draws, per-window bits per character) of a run's evaluation: block 0's
    figure (or the plain model's), then the chain's."""
    c = r.get("chain_likelihood")
    per_window = r.get("bpc_per_window") or (c["per_window"] if c and r["mode"] == "plain" else None)
    rows = [(r.get("bpc_label", "next-token"), r["bpc"], r.get("bpc_se", float("nan")), "-", "-", "1",
             None if per_window is None else [b / r["chars_per_token"] for b in per_window])]
    if c is not None and r["mode"] != "plain":
        enumerated = "" if c["top_k"] is None else f" x {c.get('enumerated', c['top_k'] + 2)}"
        rows.append((c["label"], c["bpc"], c["bpc_se"], f"{c['bpc_se_estimator']:.4f}", bias_cell(c),
                     f"{c['draws']}{enumerated}", [b / r["chars_per_token"] for b in c["per_window"]]))
    return rows


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """The mean of a - b over the same windows and its standard error (the spread of the per-window differences)."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    return float(d.mean()), float(d.std() / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def paired_cell(per_window: list[float] | None, r1: dict[str, Any]) -> str:
    """compare's cell of a row's bits minus the B=1 model's, paired over the shared windows."""
    base = likelihood_rows(r1)[0][-1]
    if per_window is None or base is None or len(base) != len(per_window):
        return "-"
    mean, se = paired_difference(per_window, base)
    return f"{mean:+.4f} +- {se:.4f}"


def check_windows(windows: int) -> None:
    """--windows follows its rule: N >= 0, where 0 means every held-out window."""
    if windows < 0:
        raise ConfigError(f"--windows must be >= 0 (0: all of them), got {windows}")


def judge_section(configs: dict[int, RunConfig], results: dict[int, dict[str, Any]]) -> tuple[dict | None, list[str]]:
    """The independent judge the runs were evaluated with (the same for all, and none of them) and the report's lines
    on it: its held-out BPC against every judged model's (flagged when not below all), MAUVE's ceiling and floor."""
    judges = {r["judge"]["run"] for r in results.values() if "judge" in r}
    if not judges:
        return None, ["**No judge**: the runs were evaluated with `--judge none`; no generative perplexity or MAUVE.", ""]
    if len(judges) > 1 or any("judge" not in r for r in results.values()):
        raise ConfigError(f"the runs were evaluated with different judges ({', '.join(sorted(judges))}): evaluate "
                          "them with one")
    judge = next(r["judge"] for r in results.values())
    compared = {Path(r["run"]).resolve() for r in results.values()}
    if Path(judge["run"]).resolve() in compared:
        raise ConfigError(f"the judge {judge['run']} is one of the compared runs: use an independent judge")
    return judge, judge_paragraph(judge, [(f"B={B}", r["bpc"]) for B, r in results.items()])


def mauve_section(results: dict[int, dict[str, Any]], judge: dict | None,
                  generated: list[tuple[str, dict]] | None = None) -> list[str]:
    """The report's MAUVE table (`judge.mauve_table`): each run and bridge against held-out continuations of the same
    prompts, with the ceiling and floor rows. generated: (row label, text_quality result) of each generated set, when
    not every run's and bridge's samples."""
    bounds = (judge or {}).get("bounds")
    if not bounds:
        return []
    if generated is None:
        generated = [(f"B={B}, {'plain' if name == 'plain' else 'bridge ' + name}", s["mauve"])
                     for B, r in results.items() for name, s in r["samples"].items() if "mauve" in s]
    return mauve_table(bounds, generated)


def write_arlm_report(out_dir: Path, configs: dict[int, RunConfig], results: dict[int, dict[str, Any]],
                      artifacts: dict[int, Any]) -> None:
    """compare's report: every run's samples scored by the independent judge (`judge.py`, never a compared run), one
    row per run and bridge, MAUVE with its ceiling and floor."""
    c1, r1 = configs[1], results[1]
    judge, judge_lines = judge_section(configs, results)
    (out_dir / "generative_perplexity.json").write_text(json.dumps(
        {B: {name: s.get("gen_ppl") for name, s in r["samples"].items()} for B, r in results.items()}, indent=2) + "\n")
    header = ["B", "readout", "BPC", "chain BPC", "gen. ppl", "distinct-2", "distinct-4", "longest run", "chars/s",
              "no cache", "train s", "ms/step per block", "peak train mem MiB"]
    rows = []
    for B, r in results.items():
        for name, s in r["samples"].items():
            rows.append({"B": str(B), "readout": "next-token CE (plain)" if name == "plain" else f"bridge {name}",
                         "BPC": f"{r['bpc']:.4f}", "chain BPC": chain_bpc_cell(configs[B], r, name),
                         "gen. ppl": f"{s['gen_ppl']:.2f}" if "gen_ppl" in s else "-",
                         "distinct-2": f"{s['distinct_2']:.3f}", "distinct-4": f"{s['distinct_4']:.3f}",
                         "longest run": f"{s['longest_run_mean']:.1f} / {s['longest_run_max']}",
                         "chars/s": f"{s['chars_per_s']:.0f}", "no cache": f"{s['chars_per_s_no_cache']:.0f}",
                         **training_cost(configs[B], r)})
    lines = [f"# End-to-end vs DiffusionBlocks: an autoregressive language model on {Path(c1.data.path).name}", "",
             equal_compute(c1, "model (B=1, plain next-token cross-entropy)", f" x {c1.model.seq_len} characters")
             + ". Model: "
             f"Llama-style, {c1.model.depth} layers, width {c1.model.hidden_size}. BPC: held-out next-token bits per "
             f"character over {r1['num_windows']} windows spread over the held-out split, the same for every run "
             "(chains: block 0 alone at sigma_max, L/B layers); chain BPC: the chain's own next-token distribution "
             "(all blocks, the run's steps, sampler and bridge; the row of that bridge), an estimate (ours; the paper "
             "reports no likelihood for this model) +- its standard error, biased up (see the likelihood table). "
             f"Samples: {r1['num_prompts']} "
             f"held-out prompts of {c1.sample.prompt_chars} characters, {r1['new_chars']} new characters each, readout "
             f"{r1['readout']}; gen. ppl: their perplexity per character under the independent judge (below); longest "
             "run: the longest stretch of a repeated unit, mean / max over samples.", ""] + judge_lines
    lines += markdown_table(header, rows)
    lines += mauve_section(results, judge)
    lines += ["", "## Held-out likelihood", "",
              "Bits per character on the shared windows, +- the standard error over windows (the text's spread and the "
              "estimator's draws); the estimator's own error (what remains on these fixed windows, e.g. for a paired "
              "comparison) and its upward bias beside it (the figure is an upper bound in expectation): the delta "
              "method's estimate, and how much lower it is than the same estimate from half the draws (the bias left "
              "is about that fall where it shrinks as 1 / draws, more where a rare draw carries most of a token's "
              "probability).", ""]
    lines += markdown_table(["B", "what", "BPC", "estimator SE", "bias (up): delta / fall", "draws x enumerated",
                             "minus B=1's"], [
        {"B": str(B), "what": what, "BPC": f"{bpc:.4f} +- {se:.4f}", "estimator SE": est,
         "bias (up): delta / fall": bias,
         "draws x enumerated": dr, "minus B=1's": paired_cell(per_window, r1)}
        for B, r in results.items() for what, bpc, se, est, bias, dr, per_window in likelihood_rows(r)])
    lines += ["", "minus B=1's: the difference from the B=1 model's bits on the same windows, +- the standard error of "
              "the per-window differences (paired: the text's spread cancels).", ""]
    lines += ["", memory_note(r1), "", "## Chain diagnostics", "",
              "Teacher-forced on the held-out windows: bits per character of each step's logits on the chain's own state "
              "and on the oracle input E[x] + sigma eps, and the mean norm of the estimate the bridge hands on (the "
              "targets have norm 1).", ""]
    lines += markdown_table(["B", "bridge", "step", "block", "sigma", "chain bits", "oracle bits", "estimate norm"], [
        {"B": str(B), "bridge": bridge, "step": str(row["step"]), "block": str(row["block"]),
         "sigma": f"{row['sigma']:.3g}", "chain bits": f"{row['chain_bits']:.4f}",
         "oracle bits": f"{row['oracle_bits']:.4f}", "estimate norm": f"{row['estimate_norm']:.3f}"}
        for B, r in results.items() for bridge, chain in r.get("chain", {}).items() for row in chain])
    decided = {B: r["decision"] for B, r in results.items() if "decision" in r}
    if decided:
        lines += ["", "Who decides: each block's share of the top-1 error its steps remove from chance's (1 - 1/V), "
                  "along the chain (its own state) and on the oracle input, with the run's bridge (-: the chain ends "
                  "above chance, so there are no shares).", ""]
        lines += markdown_table(["B", "bridge", "along the chain", "on the oracle input"], [
            {"B": str(B), "bridge": d["bridge"], "along the chain": shares_text(d["chain"]),
             "on the oracle input": shares_text(d["oracle"])} for B, d in decided.items()])
    lines += ["", "## Samples", ""]
    for B, r in results.items():
        for name, s in r["samples"].items():
            lines += [f"B={B}, {name}:", "", "```"]
            lines += [f"{p}|{t}" for p, t in zip(s["prompts"][:2], s["texts"][:2])]
            lines += ["```", ""]
    lines += ["![loss curves](loss_curves.png)", ""]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot_loss_curves(out_dir, configs)

