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

Evaluation: held-out next-token bits per character (block 0 at sigma_max for the chain, the predictive
distribution of the baseline), the chain diagnostics teacher-forced on held-out text (bits of each step's
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
from ..judge import (Judge, distinct_n, features, generative_bits, held_out_continuations, longest_repeated_run,
                     mauve_bounds, require_mauve, resolve_judge, text_quality)
from ..models.arlm import ARDenoiser, CausalLM, KVCache, swiglu_width
from ..models.hf_llama import HFTrunk
from ..noise import Partition, sigma_grid
from ..options import EvaluateOptions, SampleOptions, option
from ..precond import append_dims
from ..pretrained import from_pretrained
from ..report import equal_compute, markdown_table, memory_note, plot_loss_curves, training_cost
from ..sampling import SAMPLERS
from ..seeding import make_generator, sample_seeds
from ..text import held_out_windows, usable_logits
from .base import Evaluation, layers_of_denoiser
from .text import (BackboneConfig, LlamaModelConfig, TextRunConfig, TextSampleConfig, TextTask, check_pretrained_run,
                   llama_trunk_config, load_pretrained)

logger = logging.getLogger(__name__)

BRIDGES = ("estimate", "softmax", "argmax", "sample")


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


# ---- generation


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
                   sampler: str = "euler") -> torch.Tensor:
    """Continues prompts (N, P) by `new` tokens with a BlockwiseDenoiser of ARDenoiser blocks; returns (N, P + new).
    Each token is `sampler` run down the quantile grid of `steps` points (default B), the estimate handed on by the
    bridge, the last evaluation's logits read out. Sample i draws its noise and readout uniforms from the generator
    of seed i (the `sample` bridge: one more uniform per evaluation). num_tokens: the vocabulary's size, when the
    model has more ids; the ids above it are never drawn or bridged.

    Without the cache every evaluation runs the block's full training forward over the window
    (`ARDenoiser.denoise`); with it, the clean window is kept as keys and values (`ARDenoiser.denoise_next`).
    """
    N = prompts.shape[0]
    device = prompts.device
    steps = steps or model.num_blocks
    sigmas = sigma_grid(model.partition.axis, steps).to(device, torch.float32)  # (steps + 1,), last 0
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
                  **readout) -> torch.Tensor:
    """Either model kind, batched; readout: temperature, top_p, greedy; num_tokens: the vocabulary's size; steps,
    bridge and sampler: default the run's (sample.steps 0: B)."""
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
                                      sampler=sampler or cfg.sample.sampler, **readout))
    return torch.cat(out)


# ---- metrics


@torch.no_grad()
def next_token_bits(model, windows: torch.Tensor, *, seed: int = 0, batch_size: int = 64) -> float:
    """Held-out bits per character of each window's characters 1..L-1 given those before: the baseline's logits,
    or block 0's at sigma_max (its noisy input is almost pure noise: a predictive distribution from context)."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size]
        if is_plain(model):
            logits = model.blocks[0](x)[:, :-1]
        else:
            blk = model.blocks[0]
            sigma = torch.full(x.shape, float(model.partition.axis.hi), device=x.device)
            eps = torch.randn(*x.shape, blk.E.shape[1], generator=make_generator(seed, "arlm-bpc", i)).to(x.device)
            logits = blk.denoise(eps * sigma[..., None], sigma, x)[1][:, 1:]
        ce = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="sum")
        total, count = total + float(ce), count + x[:, 1:].numel()
    return total / count / math.log(2)


def _at_each_position(sigma: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The samplers' noise level per sequence (N,) at every position of tokens (N, L), as a contiguous (N, L)."""
    return sigma[:, None].expand(tokens.shape).contiguous()


@torch.no_grad()
def _teacher_forced_chain(model, x: torch.Tensor, sigmas: torch.Tensor, bridge: str, g: torch.Generator, *,
                          sampler: str = "euler", callback=None) -> torch.Tensor:
    """The sampler's chain on every position of windows x (N, L) at once, the clean context given (the training
    forward); returns the last evaluation's logits (N, L, V). callback(k, logits, estimate) after step k's evaluation at
    its own sigma. The noise and the `sample` bridge's draws (temperature 1) come from g."""
    def denoise(block, z: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor):
        return block.denoise(z, _at_each_position(sigma, tokens), tokens)

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
    return block.denoise(z, _at_each_position(sigma, tokens), tokens)


@torch.no_grad()
def chain_bits(model, windows: torch.Tensor, *, bridge: str, steps: int | None = None, seed: int = 0,
               batch_size: int = 64, sampler: str = "euler") -> list[dict[str, Any]]:
    """The chain teacher-forced on held-out windows: per step, the bits per token of the owning block's logits on
    the chain's own state and on the oracle input E[x] + sigma eps, and the norm of the chain's estimate (a
    collapse toward 0 shows here). Positions 1..L-1, as next_token_bits (position 0 has no context)."""
    steps = steps or model.num_blocks
    sigmas = sigma_grid(model.partition.axis, steps).to(windows.device, torch.float32)
    rows = [{"step": k, "sigma": float(sigmas[k]), "block": int(model.partition.owner(sigmas[k:k + 1])[0]),
             "chain_bits": 0.0, "oracle_bits": 0.0, "estimate_norm": 0.0} for k in range(steps)]
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
            rows[k]["estimate_norm"] += float(est[:, 1:].norm(dim=-1).sum())

        _teacher_forced_chain(model, x, sigmas, bridge, g, sampler=sampler, callback=measure)
        n += x[:, 1:].numel()
    for row in rows:
        row["chain_bits"] /= n * math.log(2)
        row["oracle_bits"] /= n * math.log(2)
        row["estimate_norm"] /= n
    return rows


def mixture_bits(probs: torch.Tensor, targets: torch.Tensor, samples: int) -> float:
    """Summed bits of targets (N, T) under the mean of `samples` distributions per row: probs (N * samples, T, V),
    row i's copies at rows i * samples ... (i + 1) * samples - 1, aligned with the targets."""
    N, T = targets.shape
    q = probs.view(N, samples, T, -1).mean(1)  # (N, T, V)
    return float(-torch.log2(q.gather(-1, targets[..., None]).clamp_min(torch.finfo(q.dtype).tiny)).sum())


@torch.no_grad()
def sampler_bits(model, windows: torch.Tensor, *, bridge: str, steps: int, samples: int = 8, seed: int = 0,
                 batch_size: int = 64, sampler: str = "euler") -> float:
    """Held-out bits per token (positions 1..L-1) of the distribution the sampler draws the next token from after
    `steps` steps, q_K(x) = E_chain[softmax(last step's logits)](x), estimated by the mean over `samples`
    teacher-forced chains per window (log of a mean of `samples` draws: biased up for small `samples`)."""
    sigmas = sigma_grid(model.partition.axis, steps).to(windows.device, torch.float32)
    total, n = 0.0, 0
    per_batch = max(batch_size // samples, 1)  # windows per batch of batch_size chains
    for i in range(0, len(windows), per_batch):
        x = windows[i:i + per_batch]
        logits = _teacher_forced_chain(model, x.repeat_interleave(samples, 0), sigmas, bridge,
                                       make_generator(seed, "arlm-sampler-bits", i), sampler=sampler)
        # Position j's logits are the distribution of token j (its context is tokens < j).
        total += mixture_bits(logits[:, 1:].float().softmax(-1), x[:, 1:], samples)
        n += x[:, 1:].numel()
    return total / n


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
class AREvaluateOptions(EvaluateOptions):
    judge: str = option("auto", "what scores the samples (generative perplexity, MAUVE's features): auto = the "
                        "independent judge of the run's data, cached under --cache-dir/judges and trained first if "
                        "missing; none; or a plain run (task arlm, model.mode=plain) with the run's vocabulary")
    prompts: int = option(100, "held-out prompts continued")
    new: int = option(200, "characters added to each prompt")
    bridges: str = option(",".join(BRIDGES), "bridges measured (chain runs)")
    windows: int = option(0, "held-out windows for the bits (0 = all)")
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
        if options.mauve_prompts < 0 or options.mauve_new < 1:
            raise ConfigError("--mauve-prompts must be at least 0 and --mauve-new at least 1")
        data = self.load_run_data(cfg, run_dir)
        prompts = self.held_out_prompts(data.test, options.prompts, cfg.sample.prompt_chars,
                                        ("--prompts", "sample.prompt_chars")).to(options.device)
        P = cfg.sample.prompt_chars
        mauve_on = options.mauve_prompts > 0 and options.judge != "none"
        if mauve_on:  # what MAUVE needs, checked before a judge is trained
            require_mauve()
            reference, _, _ = held_out_continuations(data.test, options.mauve_prompts, P, options.mauve_new)
        judge, judge_info = resolve_judge(options.judge, cfg, run_dir, cache_dir=options.cache_dir,
                                          device=options.device, progress=options.progress)
        windows = held_out_windows(data.test, cfg.model.seq_len)
        windows = (windows[:options.windows] if options.windows else windows).to(options.device)
        r: dict[str, Any] = {"run": str(run_dir), "num_blocks": cfg.blocks.num_blocks, "mode": cfg.model.mode,
                             "num_windows": len(windows), "seq_len": cfg.model.seq_len,
                             "bits_per_token": next_token_bits(model, windows, seed=options.seed),
                             "chars_per_token": data.test.chars_per_token}
        r["bpc"] = r["bits_per_token"] / r["chars_per_token"]
        if not is_plain(model):
            r["chain"] = {b: chain_bits(model, windows, bridge=b, seed=options.seed, sampler=cfg.sample.sampler)
                          for b in bridges}
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
            lines.append(f"  judge {r['judge']['run']}: held-out BPC {r['judge']['held_out_bpc']:.4f}")
            for bound, b in r["judge"].get("bounds", {}).items():
                if isinstance(b, dict):
                    lines.append(f"  MAUVE {bound}: {b['mauve']:.3f} ({b['num_p']} vs {b['num_q']}, "
                                 f"{b['clusters']} clusters)")
        for name, s in r["samples"].items():
            ppl = f"gen. perplexity {s['gen_ppl']:.2f}, " if "gen_ppl" in s else ""
            if "mauve" in s:
                ppl += f"MAUVE {s['mauve']['mauve']:.3f}, "
            lines.append(f"  {name}: {ppl}distinct-2 {s['distinct_2']:.3f}, distinct-4 {s['distinct_4']:.3f}, longest "
                         f"run {s['longest_run_mean']:.1f} (max {s['longest_run_max']}), {s['chars_per_s']:.0f} chars/s "
                         f"({s['chars_per_s_no_cache']:.0f} without the cache)")
            lines.append("    " + (s["prompts"][0] + "|" + s["texts"][0])[:160].replace("\n", "\n    "))
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
    worse = [f"B={B} ({r['bpc']:.4f})" for B, r in results.items() if not judge["held_out_bpc"] < r["bpc"]]
    lines = [f"Judge: `{judge['run']}`, a plain causal LM trained on the training split ({judge.get('steps')} steps), "
             f"never one of the compared runs; its held-out BPC {judge['held_out_bpc']:.4f} over "
             f"{judge.get('held_out_windows')} windows of {judge.get('seq_len')}.", ""]
    if worse:
        lines += [f"**WARNING: the judge's held-out BPC {judge['held_out_bpc']:.4f} is NOT below every judged model's: "
                  f"{', '.join(worse)}. Its perplexities and MAUVE cannot rank these models.**", ""]
    return judge, lines


def mauve_section(results: dict[int, dict[str, Any]], judge: dict | None) -> list[str]:
    """The report's MAUVE table: each run and bridge against held-out continuations of the same prompts, with the
    ceiling (held-out against held-out) and floor (unigram draws) rows, each with its sample counts and clusters."""
    bounds = (judge or {}).get("bounds")
    if not bounds:
        return []
    rows = []

    def row(what: str, m: dict) -> dict[str, str]:
        return {"text": what, "MAUVE": f"{m['mauve']:.3f}", "gen. ppl (judge)": f"{2 ** m['gen_bits']:.2f}",
                "distinct-4": f"{m['distinct_4']:.3f}" if "distinct_4" in m else "-",
                "samples": f"{m['num_p']} vs {m['num_q']}", "clusters": str(m["clusters"])}

    for B, r in results.items():
        for name, s in r["samples"].items():
            if "mauve" in s:
                rows.append(row(f"B={B}, {'plain' if name == 'plain' else 'bridge ' + name}", s["mauve"]))
    c, f = bounds["ceiling"], bounds["floor"]
    rows.append(row(f"ceiling: other held-out text ({c['overlap']:.0%} of its characters also in the reference)", c))
    rows.append(row("floor: unigram draws of the training split", f))
    ok = c["mauve"] > f["mauve"]
    return ["", "## MAUVE", "",
            f"MAUVE (mauve-text, PCA to 90% of the variance, k-means; Pillutla et al. 2021) of {bounds['num']} "
            f"continuations of {bounds['new']} characters after held-out prompts of {bounds['prompt_len']}, against the "
            "held-out continuations of the same prompts, on the independent judge's features (its final normalised "
            "hidden states averaged over the continuation). gen. ppl: these continuations' perplexity under the judge.",
            ""] + markdown_table(["text", "MAUVE", "gen. ppl (judge)", "distinct-4", "samples", "clusters"], rows) + [
            "", "The judge's features tell held-out text from unigram noise: ceiling above floor." if ok else
            "**WARNING: MAUVE's ceiling is not above its floor: the judge's features do not tell text from noise.**"]


def write_arlm_report(out_dir: Path, configs: dict[int, RunConfig], results: dict[int, dict[str, Any]],
                      artifacts: dict[int, Any]) -> None:
    """compare's report: every run's samples scored by the independent judge (`judge.py`, never a compared run), one
    row per run and bridge, MAUVE with its ceiling and floor."""
    c1, r1 = configs[1], results[1]
    judge, judge_lines = judge_section(configs, results)
    (out_dir / "generative_perplexity.json").write_text(json.dumps(
        {B: {name: s.get("gen_ppl") for name, s in r["samples"].items()} for B, r in results.items()}, indent=2) + "\n")
    header = ["B", "readout", "BPC", "gen. ppl", "distinct-2", "distinct-4", "longest run", "chars/s", "no cache",
              "train s", "ms/step per block", "peak train mem MiB"]
    rows = []
    for B, r in results.items():
        for name, s in r["samples"].items():
            rows.append({"B": str(B), "readout": "next-token CE (plain)" if name == "plain" else f"bridge {name}",
                         "BPC": f"{r['bpc']:.4f}", "gen. ppl": f"{s['gen_ppl']:.2f}" if "gen_ppl" in s else "-",
                         "distinct-2": f"{s['distinct_2']:.3f}", "distinct-4": f"{s['distinct_4']:.3f}",
                         "longest run": f"{s['longest_run_mean']:.1f} / {s['longest_run_max']}",
                         "chars/s": f"{s['chars_per_s']:.0f}", "no cache": f"{s['chars_per_s_no_cache']:.0f}",
                         **training_cost(configs[B], r)})
    lines = [f"# End-to-end vs DiffusionBlocks: an autoregressive language model on {Path(c1.data.path).name}", "",
             equal_compute(c1, "model (B=1, plain next-token cross-entropy)", f" x {c1.model.seq_len} characters")
             + ". Model: "
             f"Llama-style, {c1.model.depth} layers, width {c1.model.hidden_size}. BPC: held-out next-token bits per "
             f"character over {r1['num_windows']} windows (chains: block 0 at sigma_max). Samples: {r1['num_prompts']} "
             f"held-out prompts of {c1.sample.prompt_chars} characters, {r1['new_chars']} new characters each, readout "
             f"{r1['readout']}; gen. ppl: their perplexity per character under the independent judge (below); longest "
             "run: the longest stretch of a repeated unit, mean / max over samples.", ""] + judge_lines
    lines += markdown_table(header, rows)
    lines += mauve_section(results, judge)
    lines += ["", memory_note(r1), "", "## Chain diagnostics", "",
              "Teacher-forced on the held-out windows: bits per character of each step's logits on the chain's own state "
              "and on the oracle input E[x] + sigma eps, and the mean norm of the estimate the bridge hands on (the "
              "targets have norm 1).", ""]
    lines += markdown_table(["B", "bridge", "step", "block", "sigma", "chain bits", "oracle bits", "estimate norm"], [
        {"B": str(B), "bridge": bridge, "step": str(row["step"]), "block": str(row["block"]),
         "sigma": f"{row['sigma']:.3g}", "chain bits": f"{row['chain_bits']:.4f}",
         "oracle bits": f"{row['oracle_bits']:.4f}", "estimate norm": f"{row['estimate_norm']:.3f}"}
        for B, r in results.items() for bridge, chain in r.get("chain", {}).items() for row in chain])
    lines += ["", "## Samples", ""]
    for B, r in results.items():
        for name, s in r["samples"].items():
            lines += [f"B={B}, {name}:", "", "```"]
            lines += [f"{p}|{t}" for p, t in zip(s["prompts"][:2], s["texts"][:2])]
            lines += ["```", ""]
    lines += ["![loss curves](loss_curves.png)", ""]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot_loss_curves(out_dir, configs)

