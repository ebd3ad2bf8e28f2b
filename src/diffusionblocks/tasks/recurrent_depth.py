"""Recurrent depth without backpropagation through time (method.md section 5, fifth row; Huginn, Geiping et al. 2025).

Two models of the same prelude / core / coda shape on the autoregressive task's data and tokens
(`models.recurrent`): `model.mode="huginn"`, the core iterated r times from a noise state, r drawn per step
(log-normal Poisson, mean `model.mean_recurrence`), trained with truncated backpropagation through the last
`model.bptt` iterations; and `model.mode="diffusion"`, the whole network one denoiser of the next token's
embedding (B=1, weights tied across sampler steps), trained with one forward pass at a sampled sigma. At
inference both run the core K times per token: Huginn's iterations, or K sampler steps of the denoiser (the
prelude once per token). `evaluate` measures quality against K: held-out next-character bits of the distribution the
next token is drawn from (teacher-forced context; Huginn's averaged over draws of its initial state, the denoiser's
by the chain likelihood of the autoregressive task), with standard errors, on one set of windows spread over the
held-out split for every model and K, and samples continuing held-out prompts,
their perplexity under the independent judge (`judge.py`, `--judge auto` by default: a larger plain LM trained on
the training split, never one of the compared runs), distinct 2/4-grams and longest run, and at the K's of
`--mauve-iterations` MAUVE of continued held-out prompts against their held-out continuations, with MAUVE's ceiling
and floor once per run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..chain_likelihood import LikelihoodTally, chain_likelihood
from ..config import BlocksConfig, ConfigError, RunConfig, check_choice
from ..judge import (distinct_n, features, generative_bits, longest_repeated_run, mauve_bounds, prepare_judging,
                     text_quality)
from ..models.recurrent import HuginnLM, RecurrentDenoiser, lognormal_poisson
from ..noise import Partition
from ..options import SampleOptions, option
from ..pretrained import from_pretrained
from ..seeding import make_generator, sample_seeds
from ..text import usable_logits
from ..token_chain import TokenContext, draw_token, generate_chain
from .base import Evaluation
from .text import (ChainLikelihoodOptions, ChainSampleConfig, LlamaModelConfig, TextRunConfig, TextTask, check_windows,
                   evaluation_windows, per_character, readout_settings)


@dataclass(frozen=True)
class RecurrentModelConfig(LlamaModelConfig):
    mode: str = "diffusion"        # "diffusion" (one denoiser, one forward pass per step) or "huginn" (recurrence + BPTT).
    prelude: int = 1               # Layers of the prelude, core and coda.
    core: int = 2
    coda: int = 1
    depth: int = 4                 # prelude + core + coda (the run's L; B is 1).
    mean_recurrence: float = 4.0   # Huginn: mean iterations in training (log-normal Poisson), and the default K.
    recurrence_std: float = 0.5    # Huginn: std of the log-normal.
    bptt: int = 2                  # Huginn: iterations backpropagated through (the last ones).
    state_std: float = 1.0         # Huginn: std of the initial state.

    def validate(self) -> None:
        super().validate()
        check_choice("model.mode", self.mode, ("diffusion", "huginn"))
        if min(self.prelude, self.core, self.coda) < 1:
            raise ConfigError("model.prelude, model.core and model.coda must each have at least 1 layer")
        if self.depth != self.prelude + self.core + self.coda:
            raise ConfigError(f"model.depth={self.depth} must be model.prelude + model.core + model.coda = "
                              f"{self.prelude + self.core + self.coda}")
        if self.mean_recurrence < 1 or self.bptt < 1 or self.recurrence_std <= 0 or self.state_std <= 0:
            raise ConfigError("model.mean_recurrence and model.bptt must be at least 1, the stds positive")


@dataclass(frozen=True)
class RecurrentConfig(TextRunConfig):
    name: str = "shakespeare-recurrent"
    task: str = "recurrent"
    model: RecurrentModelConfig = field(default_factory=RecurrentModelConfig)
    blocks: BlocksConfig = field(default_factory=lambda: BlocksConfig(num_blocks=1))
    sample: ChainSampleConfig = field(default_factory=ChainSampleConfig)  # sample.steps: K (0 = model.mean_recurrence)

    def validate(self) -> None:
        """The fields checked by section, then the rules across sections."""
        super().validate()
        if self.blocks.num_blocks != 1:
            raise ConfigError(f"a recurrent-depth model is one network (weights tied across iterations): "
                              f"blocks.num_blocks must be 1, got {self.blocks.num_blocks}")


def default_iterations(cfg: RunConfig) -> int:
    return cfg.sample.steps or round(cfg.model.mean_recurrence)


def is_huginn(model) -> bool:
    return isinstance(model.blocks[0], HuginnLM)


@torch.no_grad()
def generate_huginn(model, prompts: torch.Tensor, new: int, *, window: int, iterations: int,
                    seeds: list[int], temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                    num_tokens: int | None = None) -> torch.Tensor:
    """Continues prompts (N, P) by `new` tokens, each read out after `iterations` core steps over the window from a
    fresh noise state (sample i's noise and readout uniforms from the generator of seed i); ids from num_tokens
    (the vocabulary's size) on are never drawn."""
    D = model.tok_embed.embedding_dim
    gens = [make_generator(s, "recurrent-sample") for s in seeds]
    ctx = TokenContext(prompts, window, cached=False)
    for _ in range(new):
        w = ctx.window_tokens
        state = torch.stack([torch.randn(w.shape[1], D, generator=g) for g in gens]).to(prompts.device)  # (N, T, D)
        u = torch.stack([torch.rand(1, generator=g, dtype=torch.float64) for g in gens])[:, 0].to(prompts.device)
        logits = usable_logits(model(w, iterations, state)[:, -1], num_tokens)
        ctx.append(draw_token(logits, temperature, top_p, greedy, u))
    return ctx.tokens


def generate(model, cfg: RunConfig, prompts: torch.Tensor, new: int, iterations: int, seeds: list[int],
             batch_size: int = 100, num_tokens: int | None = None, **readout) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch_size):
        p, s = prompts[i:i + batch_size], seeds[i:i + batch_size]
        if is_huginn(model):
            out.append(generate_huginn(model.blocks[0], p, new, window=cfg.model.seq_len, iterations=iterations,
                                       seeds=s, num_tokens=num_tokens, **readout))
        else:
            out.append(generate_chain(model, p, new, window=cfg.model.seq_len, steps=iterations,
                                      bridge=cfg.sample.bridge, seeds=s, num_tokens=num_tokens,
                                      sampler=cfg.sample.sampler, **readout))
    return torch.cat(out)


@torch.no_grad()
def huginn_likelihood(model, windows: torch.Tensor, iterations: int, draws: int = 8, seed: int = 0,
                      batch_size: int = 64, num_tokens: int | None = None) -> dict[str, Any]:
    """Held-out bits per token (positions 1..L-1) of Huginn's next-token distribution after `iterations` core steps,
    the mean of its softmax over `draws` initial states (teacher-forced context), with LikelihoodTally's standard
    errors and bias (its distribution hardly depends on the state: both small)."""
    m = model.blocks[0]
    tally = LikelihoodTally()
    step = max(batch_size // draws, 1)
    for i in range(0, len(windows), step):
        x = windows[i:i + step]
        xs = x.repeat(draws, 1)  # (draws * n, L): draw, window
        state = torch.randn(*xs.shape, m.tok_embed.embedding_dim, generator=make_generator(seed, "recurrent-bits", i))
        logits = usable_logits(m(xs, iterations, state.to(x.device))[:, :-1], num_tokens)  # position j's: token j + 1's
        p = logits.double().softmax(-1).gather(-1, xs[:, 1:, None])[..., 0]  # (draws * n, L - 1)
        tally.add(p.view(draws, len(x), -1))
    return tally.result()


def likelihood_after(model, cfg: RunConfig, windows: torch.Tensor, iterations: int, *, huginn_draws: int = 8,
                     seed: int = 0, num_tokens: int | None = None, **chain: Any) -> dict[str, Any]:
    """The held-out bits per token of the distribution the next token is drawn from after K = `iterations` core
    steps: Huginn's (huginn_likelihood, `huginn_draws` initial states) or the denoiser's chain of K sampler steps
    (chain_likelihood.chain_likelihood with the run's sampler and bridge and the keywords `chain`)."""
    if is_huginn(model):
        return {**huginn_likelihood(model, windows, iterations, huginn_draws, seed, num_tokens=num_tokens),
                "draws": huginn_draws}
    s = cfg.sample
    return chain_likelihood(model, windows, steps=iterations, bridge=s.bridge, sampler=s.sampler, seed=seed,
                            num_tokens=num_tokens, **chain)


@dataclass(frozen=True)
class RecurrentSampleOptions(SampleOptions):
    prompt: str | None = option(None, "prompt of every sample (default: held-out prompts)")
    new: int | None = option(None, "characters to add (default: the run's sample.new_chars)")
    iterations: int | None = option(None, "core iterations (sampler steps) per token (default: sample.steps, or "
                                    "model.mean_recurrence)")


@dataclass(frozen=True)
class RecurrentEvaluateOptions(ChainLikelihoodOptions):
    line_steer: float = option(0.5, "share of the denoiser's chain likelihood's start noises shifted along the scored "
                               "token's line (magnitudes up to 3 standard deviations) and weighted back (0: none): "
                               "with many sampler steps the decision falls where the noise decides")
    iterations: str = option("1,2,4,8,16,32,64", "values of K measured")
    judge: str = option("auto", "what scores the samples (generative perplexity, MAUVE's features): auto = the "
                        "independent judge of the run's data, cached under --cache-dir/judges and trained first if "
                        "missing; none; or a plain run (task arlm, model.mode=plain) with the run's vocabulary")
    mauve_iterations: str = option("1,4,16", "the K's of --iterations whose samples also get MAUVE (each costs "
                                   "--mauve-prompts continuations of --mauve-new characters)")
    mauve_prompts: int = option(500, "held-out prompts continued for MAUVE against their held-out continuations "
                                "(0: no MAUVE)")
    mauve_new: int = option(128, "characters each MAUVE continuation adds")
    prompts: int = option(50, "held-out prompts continued, per K")
    new: int = option(100, "characters added to each prompt")
    windows: int = option(512, "held-out windows for the bits, spread evenly over the split, the same for every "
                          "model and K, and the autoregressive task's (0 = all)")
    draws: int = option(8, "Huginn: starting states per window whose next-token distributions are averaged for the "
                        "bits")


class RecurrentDepthTask(TextTask):
    name = "recurrent"
    config_class = RecurrentConfig
    sample_suffixes = (".txt",)
    sample_options = RecurrentSampleOptions
    evaluate_options = RecurrentEvaluateOptions

    def build_block(self, cfg: RunConfig, b: int, generator: torch.Generator | None = None):
        m = cfg.model
        shape = dict(hidden_size=m.hidden_size, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, mlp_multiple=m.mlp_multiple,
                     prelude=m.prelude, core=m.core, coda=m.coda)
        if m.mode == "huginn":
            net = HuginnLM(m.vocab_size, state_std=m.state_std, **shape)
            net.initialize_weights(generator)
            return net
        lo, hi = self.partition(cfg).training_range(b)
        return self.with_run_table(RecurrentDenoiser(m.vocab_size, sigma_data=cfg.noise.sigma_data, sigma_min=lo,
                                                     sigma_max=hi, **shape), cfg, generator)

    def loss_inputs(self, cfg: RunConfig, partition: Partition, b: int, batch: torch.Tensor,
                    generator: torch.Generator) -> dict[str, Any]:
        """Huginn: this step's number of iterations, then its noise state; the denoiser: a sigma and noise per position."""
        m = cfg.model
        N, L = batch.shape
        at = generator.device  # every draw where the generator is (the device, when the data is resident there)
        if m.mode == "huginn":
            # The count steers the host's loop: drawn on the host (from a generator of the same seed off the
            # CPU) so that the step never waits for the device to read it.
            host = generator if at.type == "cpu" else torch.Generator().manual_seed(generator.initial_seed())
            r = lognormal_poisson(m.mean_recurrence, m.recurrence_std, host)
            return {"tokens": batch, "iterations": r, "bptt": m.bptt,
                    "state": torch.randn(N, L, m.hidden_size, generator=generator, device=at)}
        sigma = partition.sample(b, N * L, generator=generator, device=at).float().view(N, L)
        return {"tokens": batch, "sigma": sigma, "noise": torch.randn(N, L, m.hidden_size, generator=generator,
                                                                      device=at)}

    # ---- inference

    def _prompts(self, cfg: RunConfig, num: int, prompt: str | None, run_dir: Path) -> torch.Tensor:
        return self.prompts(cfg, run_dir, num, prompt, cfg.sample.prompt_chars)

    def _texts(self, run_dir: Path, ids: torch.Tensor, skip: int = 0) -> list[str]:
        vocab = self.run_vocabulary(run_dir)
        return [vocab.decode(row[skip:]) for row in ids.cpu()]

    def _generate(self, model, cfg: RunConfig, run_dir: Path, prompts: torch.Tensor, new: int, iterations: int,
                  seeds: list[int]) -> torch.Tensor:
        """`generate` with the run's readout, drawing only ids of its vocabulary."""
        return generate(model, cfg, prompts, new, iterations, seeds, num_tokens=len(self.run_vocabulary(run_dir)),
                        **readout_settings(cfg))

    def draw_samples(self, model, cfg: RunConfig, run_dir: Path, device: torch.device) -> list[str]:
        """sample.num continuations of K = default_iterations core iterations per token."""
        s = cfg.sample
        prompts = self._prompts(cfg, s.num, s.prompt, run_dir).to(device)
        ids = self._generate(model, cfg, run_dir, prompts, s.new_chars, default_iterations(cfg),
                             sample_seeds(cfg.train.seed, s.num))
        return self._texts(run_dir, ids)

    def sample(self, run_dir: Path, model, cfg: RunConfig, options: RecurrentSampleOptions) -> None:
        new = cfg.sample.new_chars if options.new is None else options.new
        K = default_iterations(cfg) if options.iterations is None else options.iterations
        if new < 1 or K < 1:
            raise ConfigError("--new and --iterations must be at least 1")
        prompts = self._prompts(cfg, options.num, options.prompt or cfg.sample.prompt, run_dir).to(options.device)
        seeds = sample_seeds(options.seed, options.num)
        ids = self._generate(model, cfg, run_dir, prompts, new, K, seeds)
        self.write_samples(options.out, self._texts(run_dir, ids), show=3)

    def evaluate(self, run_dir: Path, options: RecurrentEvaluateOptions) -> Evaluation:
        Ks = _integers("--iterations", options.iterations)
        if not Ks or min(Ks) < 1 or options.prompts < 1 or options.new < 1 or options.draws < 1:
            raise ConfigError("--iterations, --prompts, --new and --draws must be at least 1")
        if options.mauve_prompts < 0 or options.mauve_new < 1:
            raise ConfigError("--mauve-prompts must be at least 0 and --mauve-new at least 1")
        check_windows(options.windows)
        options.check_chain()
        model, cfg = from_pretrained(run_dir, options.device)
        data = self.load_run_data(cfg, run_dir)
        P = cfg.sample.prompt_chars
        mauve_Ks = [K for K in Ks if K in _integers("--mauve-iterations", options.mauve_iterations)]
        judge, judge_info, reference = prepare_judging(
            options.judge, cfg, run_dir, data.test, mauve_prompts=options.mauve_prompts if mauve_Ks else 0,
            prompt_len=P, new=options.mauve_new, cache_dir=options.cache_dir, device=options.device,
            progress=options.progress)
        mauve_on = reference is not None
        windows = evaluation_windows(data.test, cfg.model.seq_len, options.windows).to(options.device)
        prompts = self.held_out_prompts(data.test, options.prompts, cfg.sample.prompt_chars,
                                        ("--prompts", "sample.prompt_chars")).to(options.device)
        r: dict[str, Any] = {}
        if judge is not None:
            r["judge"] = judge_info
        if mauve_on:  # ceiling and floor once: they do not depend on K
            reference_features = features(judge, reference, P)
            r["judge"]["bounds"] = mauve_bounds(judge, data, options.mauve_prompts, P, options.mauve_new,
                                                seed=options.seed, reference_features=reference_features)
        rows = []
        for K in Ks:
            seeds = sample_seeds(options.seed, len(prompts))
            t0 = time.perf_counter()
            ids = self._generate(model, cfg, run_dir, prompts, options.new, K, seeds)
            seconds = time.perf_counter() - t0
            texts = self._texts(run_dir, ids, prompts.shape[1])
            bits = per_character(likelihood_after(model, cfg, windows, K, huginn_draws=options.draws,
                                                  num_tokens=len(data.vocab),
                                                  **options.chain_kwargs(data.test.chars_per_token)),
                                 data.test.chars_per_token)
            row = {"iterations": K, "bits_per_token": bits["bits"], "likelihood": bits,
                   "distinct_2": distinct_n(texts, 2), "distinct_4": distinct_n(texts, 4),
                   "longest_run_mean": sum(map(longest_repeated_run, texts)) / len(texts),
                   "chars_per_s": len(prompts) * options.new / seconds, "sample": texts[0]}
            row.update({k: bits[k] for k in ("bpc", "bpc_se", "bpc_se_estimator", "bpc_bias", "bpc_fall")})
            if judge is not None:
                row["gen_bits"] = generative_bits(judge, ids, prompts.shape[1]) / data.test.chars_per_token
                row["gen_ppl"] = 2 ** row["gen_bits"]
            if mauve_on and K in mauve_Ks:
                generated = self._generate(model, cfg, run_dir, reference[:, :P].to(options.device), options.mauve_new,
                                           K, sample_seeds(options.seed, len(reference)))
                row["mauve"] = text_quality(judge, generated.cpu(), reference, P, seed=options.seed,
                                            reference_features=reference_features,
                                            chars_per_token=data.test.chars_per_token)
            rows.append(row)
        r.update({"run": str(run_dir), "mode": cfg.model.mode, "num_windows": len(windows), "draws": options.draws,
                  "num_prompts": len(prompts), "new_chars": options.new, "readout": readout_settings(cfg),
                  "mauve_iterations": mauve_Ks if mauve_on else [], "by_iterations": rows})
        return Evaluation(r)

    def evaluation_name(self, cfg: RunConfig, options: RecurrentEvaluateOptions) -> str:
        return f"eval-K{options.iterations.replace(',', '-')}-p{options.prompts}-seed{options.seed}"

    def format_evaluation(self, r: dict[str, Any]) -> str:
        lines = [f"{r['run']} ({r['mode']}): quality against the core's iterations K"]
        if "judge" in r:
            j = r["judge"]
            lines.append(f"  judge {j['run']}: held-out BPC {j['held_out_bpc']:.4f}")
            worse = [f"K={row['iterations']} ({row['bpc']:.4f})" for row in r["by_iterations"]
                     if not j["held_out_bpc"] < row["bpc"]]
            if worse:
                lines.append(f"  WARNING: the judge's held-out BPC is NOT below the model's at {', '.join(worse)}")
            for bound, b in j.get("bounds", {}).items():
                if isinstance(b, dict):
                    lines.append(f"  MAUVE {bound}: {b['mauve']:.3f} ({b['num_p']} vs {b['num_q']}, "
                                 f"{b['clusters']} clusters)")
        for row in r["by_iterations"]:
            ppl = f", gen. perplexity {row['gen_ppl']:.2f}" if "gen_ppl" in row else ""
            if "mauve" in row:
                ppl += f", MAUVE {row['mauve']['mauve']:.3f}"
            se = f" +- {row['bpc_se']:.4f}" if "bpc_se" in row else ""
            lines.append(f"  K={row['iterations']}: BPC {row['bpc']:.4f}{se}{ppl}, distinct-4 {row['distinct_4']:.3f}, "
                         f"longest run {row['longest_run_mean']:.1f}, {row['chars_per_s']:.0f} chars/s")
        return "\n".join(lines)


def _integers(flag: str, text: str) -> list[int]:
    """A comma-separated list of integers, or one clear message."""
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a comma-separated list of integers") from None


__all__ = ["RecurrentConfig", "RecurrentDepthTask", "RecurrentModelConfig", "generate_huginn", "huginn_likelihood",
           "likelihood_after"]
