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
B=1) is the same transformer trained on next-token cross-entropy. The chain's math (generation, its diagnostics,
its likelihood) is in token_chain.py and chain_likelihood.py, which the recurrent-depth task shares; this module
holds the task: its config, options, evaluation and report.

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

from ..chain_likelihood import chain_likelihood, next_token_likelihood
from ..config import BlocksConfig, ConfigError, RunConfig, check_choice
from ..judge import (Judge, bounds_lines, distinct_n, features, generative_bits, judge_section, longest_repeated_run,
                     mauve_bounds, mauve_section, prepare_judging, text_quality)
from ..metrics import decision_shares, shares_text
from ..models.arlm import ARDenoiser, CausalLM, swiglu_width
from ..models.hf_llama import HFTrunk
from ..noise import BLOCK_GRID, Partition
from ..options import SampleOptions, option
from ..pretrained import from_pretrained
from ..report import equal_compute, markdown_table, memory_note, plot_loss_curves, training_cost
from ..sampling import SAMPLERS
from ..seeding import sample_seeds
from ..token_chain import chain_bits, generate_chain, generate_plain, is_plain
from .base import Evaluation, layers_of_denoiser
from .text import (BRIDGES, BackboneConfig, ChainLikelihoodOptions, ChainSampleConfig, LlamaModelConfig, TextRunConfig,
                   TextTask, check_pretrained_run, check_windows, evaluation_windows, llama_trunk_config,
                   load_pretrained, per_character, readout_settings)

logger = logging.getLogger(__name__)


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
class AutoregressiveConfig(TextRunConfig):
    name: str = "shakespeare-arlm"
    task: str = "arlm"
    model: ARModelConfig = field(default_factory=ARModelConfig)
    blocks: BlocksConfig = field(default_factory=lambda: BlocksConfig(gamma=0.1))
    sample: ChainSampleConfig = field(default_factory=ChainSampleConfig)

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


# ---- generation and judging of a run (the chain's math: token_chain.py and chain_likelihood.py)


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

