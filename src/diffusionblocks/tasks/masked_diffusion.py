"""A masked-diffusion language model trained block by block (method.md section 5; the paper's text8 setting).

The noise axis is the masking time t of absorbing-state diffusion (`noise.MaskingTime`); the blocks
split it into intervals of equal ELBO mass (linear alpha: t_b = b/B), block 0 the most masked. Each
block is a `models.mdlm.MaskedDiffusionTransformer` of its layers, trained on the ELBO integrand at t
drawn from its interval.

Evaluation: bits per character as the ELBO on held-out text, with t stratified over K equal-mass
strata (each evaluated by the block that owns it) and its standard error over R repetitions of the
estimate's randomness (t within each stratum, and the masks); the bits each block's interval adds up
to. Sampling: ancestral unmasking from all-masked to clean over S steps, each step by the block that
owns its t, with an optional fixed prefix (prompt), one for all samples or one per sample. With a judge
(`judge.py`, `--judge auto` by default): the samples' perplexity under it, and MAUVE of samples continuing held-out
prompts against the held-out rest of their windows, with its ceiling and floor.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from ..config import ConfigError, RunConfig, check_choice
from ..judge import (bounds_lines, distinct_n, features, generative_bits, judge_section, longest_repeated_run,
                     mauve_bounds, mauve_section, prepare_judging, text_quality)
from ..models.arlm import swiglu_width
from ..models.hf_llama import HFMaskedDiffusion
from ..models.layers import take_layers
from ..models.mdlm import T_FLOOR, MaskedDiffusionTransformer
from ..noise import MaskingTime, Partition
from ..options import EvaluateOptions, SampleOptions, option
from ..pretrained import from_pretrained
from ..report import equal_compute, markdown_table, memory_note, plot_loss_curves, training_cost
from ..seeding import derive_seed, make_generator
from ..text import Vocabulary, held_out_windows, usable_logits
from .base import Evaluation
from .text import (BackboneConfig, TextModelConfig, TextRunConfig, TextSampleConfig, TextTask, check_pretrained_run,
                   llama_trunk_config, load_pretrained)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskedLMConfig(BackboneConfig, TextModelConfig):
    """Our trunk is DiT's layers (LayerNorm, GELU MLP, learned positions); backbone "transformers" is Llama's (RMSNorm,
    rotary positions, SwiGLU of hidden width 2/3 * mlp_ratio * hidden_size), bidirectional."""

    seq_len: int = 256           # Characters per training sequence (and the longest the model takes).
    hidden_size: int = 256       # Transformer width.

    def validate(self) -> None:
        super().validate()
        self.check_backbone()


@dataclass(frozen=True)
class MaskingConfig:
    schedule: str = "linear"     # alpha(t): "linear" (1 - t, the default) or "cosine" (1 - cos(pi/2 (1 - t))).

    def validate(self) -> None:
        check_choice("noise.schedule", self.schedule, ("linear", "cosine"))


@dataclass(frozen=True)
class MaskedDiffusionConfig(TextRunConfig):
    name: str = "shakespeare-mdlm"
    task: str = "mdlm"
    model: MaskedLMConfig = field(default_factory=MaskedLMConfig)
    noise: MaskingConfig = field(default_factory=MaskingConfig)
    sample: TextSampleConfig = field(default_factory=TextSampleConfig)  # steps: S unmasking steps (0 = seq_len);
                                                                        # prompt: a fixed prefix ("" = none)

    def validate(self) -> None:
        """The fields checked by section, then the rules across sections."""
        super().validate()
        if self.data.tokenizer != "char":
            raise ConfigError("the masked-diffusion task reads characters (its bits per character are the ELBO's per "
                              "token): data.tokenizer='bpe' is for the arlm task")
        check_pretrained_run(self)


# ---- sampling and the ELBO


def unmasking_grid(axis: MaskingTime, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler's times t_0 = 1 > ... > t_S = 0 in equal steps of alpha, and alpha(t_i); float64, (S + 1,) each."""
    ts = axis.icdf(torch.linspace(1, 0, steps + 1, dtype=torch.float64))
    return ts, axis.alpha(ts)


def reveal_probability(alpha_s: torch.Tensor, alpha_t: torch.Tensor) -> float:
    """The chance that a position masked at t is unmasked at s < t: (alpha(s) - alpha(t)) / (1 - alpha(t))."""
    return float((alpha_s - alpha_t) / (1 - alpha_t))


@torch.no_grad()
def sample_text(model, num: int, seq_len: int, steps: int, *, prompt: torch.Tensor | None = None,
                temperature: float = 1.0, seed: int = 0, device: str | torch.device = "cpu",
                batch_size: int = 64, num_tokens: int | None = None) -> torch.Tensor:
    """Ancestral unmasking over `steps` steps of t from 1 to 0 (equal steps of alpha); returns (num, seq_len) ids.

    At each step t -> s the block owning t predicts every masked position; each masked position is revealed
    with probability (alpha(s) - alpha(t)) / (1 - alpha(t)), taking a token drawn from that prediction by
    Gumbel-max in float64 (argmax of logits / temperature - log(-log U)), as MDLM's reference draws it.
    Positions given (the prompt: (P,) for every sample, or (num, P), one per sample) are never masked, so never
    change. Sample i uses the randomness of (seed, i), whatever its prompt.
    num_tokens: the vocabulary's size, when the model has more ids; those above are never drawn.
    """
    if prompt is not None and prompt.dim() == 2 and len(prompt) != num:
        raise ValueError(f"one prompt per sample: {num} samples but prompts of shape {tuple(prompt.shape)}")
    ts, alphas = unmasking_grid(model.partition.axis, steps)  # t_0 = 1 ... t_S = 0
    mask_id = model.blocks[0].mask_id
    out = []
    for start in range(0, num, batch_size):
        idx = range(start, min(start + batch_size, num))
        x = torch.full((len(idx), seq_len), mask_id, dtype=torch.long, device=device)
        if prompt is not None and prompt.shape[-1]:
            given = prompt if prompt.dim() == 1 else prompt[start:start + len(idx)]  # (P,) or (n, P)
            x[:, :prompt.shape[-1]] = given.to(device)
        gens = [make_generator(seed, i, "mdlm-sample") for i in idx]
        for i in range(steps):
            masked = x == mask_id  # (n, L)
            if not bool(masked.any()):
                break
            logits = usable_logits(model(x, torch.full((len(idx),), float(ts[i]), device=device)), num_tokens)
            V = logits.shape[-1]
            # From each sample's own generator: a uniform per position (reveal?) and one per position and token.
            u = torch.stack([torch.rand(seq_len, generator=g, dtype=torch.float64) for g in gens]).to(device)  # (n, L)
            U = torch.stack([torch.rand(seq_len, V, generator=g, dtype=torch.float64) for g in gens]).to(device)
            reveal = u < reveal_probability(alphas[i + 1], alphas[i])
            token = (logits.double() / temperature - (-U.log()).log()).argmax(-1)  # Gumbel-max, (n, L)
            x = torch.where(masked & reveal, token, x)
        out.append(x.cpu())
    return torch.cat(out)


@torch.no_grad()
def elbo_bits(model, windows: torch.Tensor, *, strata: int, seed: int, batch_size: int = 64,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One estimate of the ELBO's bits per character over `windows` (M, L): (per stratum of t (K,), per block (B,),
    per window (M,)).

    t for window m in stratum k is icdf((k + v) / K) with v ~ U(0, 1): stratified over the training density,
    so the ELBO is the mean over strata. Every t is evaluated by the block that owns it (the router), and
    its bits are counted for that block, so the per-block values add up to the ELBO. Each window draws its
    own t and masks, so the windows' estimates are independent given the windows.
    """
    axis, mask_id = model.partition.axis, model.blocks[0].mask_id
    M, L = windows.shape
    per_window = torch.zeros(strata, M, dtype=torch.float64)
    per_block = torch.zeros(model.num_blocks, dtype=torch.float64)
    for k in range(strata):
        g = make_generator(seed, k, "elbo")
        v = torch.rand(M, generator=g, dtype=torch.float64)
        t = axis.icdf((k + v) / strata).clamp_min(T_FLOOR)  # (M,)
        u = torch.rand(M, L, generator=g)  # the masks' uniforms
        for i in range(0, M, batch_size):
            x, tt = windows[i:i + batch_size].to(device), t[i:i + batch_size]
            keep = axis.alpha(tt)
            masked = (u[i:i + batch_size] < (1 - keep).float()[:, None]).to(device)  # (n, L)
            logits = model(torch.where(masked, mask_id, x), tt.float().to(device))  # (n, L, V)
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x, reduction="none")  # (n, L)
            # The integrand -alpha'/(1 - alpha) over t's density -alpha': bits per character of each window.
            bits = (ce * masked).sum(1).double().cpu() / L / (1 - keep) / math.log(2)  # (n,)
            per_window[k, i:i + batch_size] = bits
            per_block.index_add_(0, model.partition.owner(tt), bits / (M * strata))
    return per_window.mean(1), per_block, per_window.mean(0)


def evaluate_bpc(model, windows: torch.Tensor, *, strata: int = 12, repeats: int = 4, seed: int = 0,
                 device: str | torch.device = "cpu") -> dict[str, Any]:
    """Held-out BPC (the ELBO), its standard errors, and the bits of each block's interval of t (they add up to
    the BPC).

    The estimate b_rm of window m in repeat r varies with the estimator's draws (t, masks) and with the
    window. bpc_se, the total, treats the M windows as drawn from the text and each b_rm as a noisy reading
    of window m's bits: the variance of the grand mean is var_m(mean_r b_rm) / M. It splits into the draws'
    part, mean_m var_r(b_rm) / (R M), and the windows' part, the rest (None where R = 1). bpc_se_repeats is
    the spread of the R estimates over the fixed windows (the draws only, as reported before). The windows
    are consecutive stretches of one text, so neighbours are correlated: the lag-1 correlation of the
    windows' means is reported, and where positive the total understates the error.
    """
    runs = [elbo_bits(model, windows, strata=strata, seed=derive_seed(seed, r, "elbo-repeat"), device=device)
            for r in range(repeats)]
    b = torch.stack([w for _, _, w in runs])  # (R, M)
    R, M = b.shape
    totals = b.mean(1)  # (R,)
    w = b.mean(0)  # (M,) each window's bits, averaged over the repeats
    total_var = float(w.var(unbiased=True)) / M if M > 1 else None
    draws_var = float(b.var(0, unbiased=True).mean()) / (R * M) if R > 1 else None
    windows_var = None if total_var is None or draws_var is None else max(total_var - draws_var, 0.0)
    lag1 = float(torch.corrcoef(torch.stack([w[:-1], w[1:]]))[0, 1]) if M > 2 else None
    return {"bpc": float(totals.mean()), "bpc_se": _sqrt(total_var), "bpc_se_draws": _sqrt(draws_var),
            "bpc_se_windows": _sqrt(windows_var), "bpc_se_repeats": _sqrt(float(totals.var()) / R if R > 1 else None),
            "window_lag1_correlation": lag1, "repeats": repeats, "strata": strata, "num_windows": M,
            "seq_len": windows.shape[1], "bpc_per_block": torch.stack([pb for _, pb, _ in runs]).mean(0).tolist(),
            "bpc_per_stratum": torch.stack([s for s, _, _ in runs]).mean(0).tolist(),
            "bpc_per_window": w.tolist()}  # for paired differences between models on the same windows


def _sqrt(var: float | None) -> float | None:
    return None if var is None else math.sqrt(var)


# ---- the task


@dataclass(frozen=True)
class MaskedSampleOptions(SampleOptions):
    steps: int | None = option(None, "unmasking steps S (default: the run's sample.steps, or seq_len)")
    prompt: str | None = option(None, "a fixed prefix of every sample (default: the run's sample.prompt)")
    temperature: float | None = option(None, "default: the run's sample.temperature")


@dataclass(frozen=True)
class BPCEvaluateOptions(EvaluateOptions):
    strata: int = option(12, "strata of t in the ELBO estimate")
    repeats: int = option(4, "independent estimates, for the standard error")
    windows: int = option(0, "held-out windows used (0 = all)")
    steps: int | None = option(None, "unmasking steps of the samples (default: the run's)")
    judge: str = option("auto", "what scores the samples (generative perplexity, MAUVE's features): auto = the "
                        "independent judge of the run's data, cached under --cache-dir/judges and trained first if "
                        "missing; none; or a plain run (task arlm, model.mode=plain) with the run's vocabulary")
    mauve_prompts: int = option(500, "held-out prompts whose windows of model.seq_len the model completes, for MAUVE "
                                "against the held-out rest of the same windows (0: no MAUVE)")
    mauve_prompt_chars: int = option(32, "characters of each MAUVE prompt; the samples fill the rest of model.seq_len")


class MaskedDiffusionTask(TextTask):
    name = "mdlm"
    config_class = MaskedDiffusionConfig
    noise_symbol = "t"
    sample_suffixes = (".txt",)
    sample_options = MaskedSampleOptions
    evaluate_options = BPCEvaluateOptions

    def noise_axis(self, cfg: RunConfig) -> MaskingTime:
        return MaskingTime(cfg.noise.schedule)

    def remaining_measure(self, cfg: RunConfig) -> str | None:
        return "cross-entropy"

    def undecided(self, cfg: RunConfig, block, inputs: dict[str, Any], level: float) -> torch.Tensor:
        """The bits per position still masked at t = level: the cross-entropy summed over the masked positions, per
        position, which is the loss without its ELBO weight 1 / (1 - alpha(t))."""
        alpha = float(self.noise_axis(cfg).alpha(torch.tensor(max(level, T_FLOOR), dtype=torch.float64)))
        return block.loss(**inputs).double() * (1 - alpha)

    def build_block(self, cfg: RunConfig, b: int, generator: torch.Generator | None = None):
        m = cfg.model
        partition = self.partition(cfg)
        lo, hi = partition.training_range(b)
        if m.backbone == "transformers":
            config = llama_trunk_config(cfg, b, m.vocab_size + 1, swiglu_width(m.hidden_size, m.mlp_ratio), m.seq_len)
            net = HFMaskedDiffusion(config, m.vocab_size, m.seq_len, axis=partition.axis, t_min=lo, t_max=hi)
            net.initialize_weights(generator)
            if m.pretrained and generator is not None and cfg.blocks.num_blocks == 1:
                load_pretrained(cfg, b, net, "trunk", "norm_final.weight", "head.weight")
            return net
        net = MaskedDiffusionTransformer(m.vocab_size, m.seq_len, m.hidden_size, cfg.layer_split()[b], m.num_heads,
                                         m.mlp_ratio, axis=partition.axis, t_min=lo, t_max=hi)
        net.initialize_weights(generator)
        return net

    def split_weights(self, cfg: RunConfig, weights: dict[str, torch.Tensor], first: int,
                      last: int) -> dict[str, torch.Tensor]:
        """Transformer layers [first, last), with copies of the token, position and time embeddings and the head."""
        return take_layers(weights, first, last)

    def loss_inputs(self, cfg: RunConfig, partition: Partition, b: int, batch: torch.Tensor,
                    generator: torch.Generator) -> dict[str, Any]:
        """t from the block's interval (under the density -alpha'(t), stratified over the batch, as MDLM and MD4
        do, since the ELBO weight makes the loss noisy) and the uniforms that decide the masks."""
        at = generator.device  # every draw where the generator is (the device, when the data is resident there)
        t = partition.sample(b, len(batch), generator=generator, device=at, stratified=True).float()
        return {"tokens": batch, "t": t, "u": torch.rand(batch.shape, generator=generator, device=at)}

    # ---- after training

    def _prompt(self, vocab: Vocabulary, text: str, seq_len: int, what: str = "the prompt") -> torch.Tensor:
        ids = vocab.encode(text, what)
        if len(ids) >= seq_len:
            raise ConfigError(f"{what} has {len(ids)} characters; model.seq_len={seq_len} leaves no room to sample")
        return ids

    def check_after_training(self, cfg: RunConfig, data: Any) -> None:
        """The samples after training keep sample.prompt: it must be of the vocabulary and leave room."""
        self.check_pretrained(cfg)
        if cfg.sample.num:
            self._prompt(data.vocab, cfg.sample.prompt, cfg.model.seq_len, "sample.prompt")

    def _samples(self, model, cfg: RunConfig, run_dir: Path, num: int, steps: int, prompt: str, temperature: float,
                 seed: int, device) -> tuple[list[str], float]:
        ids, seconds = self._sample_ids(model, cfg, run_dir, num, steps, prompt, temperature, seed, device)
        vocab = self.run_vocabulary(run_dir)
        return [vocab.decode(row) for row in ids], seconds

    def _sample_ids(self, model, cfg: RunConfig, run_dir: Path, num: int, steps: int, prompt: str, temperature: float,
                    seed: int, device) -> tuple[torch.Tensor, float]:
        """(num, seq_len) ids of samples after `prompt`, and the seconds they took."""
        vocab = self.run_vocabulary(run_dir)
        L = cfg.model.seq_len
        t0 = time.perf_counter()
        ids = sample_text(model, num, L, steps or L, prompt=self._prompt(vocab, prompt, L), temperature=temperature,
                          seed=seed, device=device, num_tokens=len(vocab))
        return ids, time.perf_counter() - t0

    def draw_samples(self, model, cfg: RunConfig, run_dir: Path, device: torch.device) -> list[str]:
        """sample.num samples of sample.steps unmasking steps."""
        s = cfg.sample
        return self._samples(model, cfg, run_dir, s.num, s.steps, s.prompt, s.temperature, cfg.train.seed, device)[0]

    def sample(self, run_dir: Path, model, cfg: RunConfig, options: MaskedSampleOptions) -> None:
        """A .txt file, one sample per paragraph; the first few are printed."""
        s = cfg.sample
        steps = s.steps if options.steps is None else options.steps
        temperature = s.temperature if options.temperature is None else options.temperature
        _check_steps(options.steps)
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ConfigError(f"--temperature must be a positive finite number, got {temperature}")
        texts, seconds = self._samples(model, cfg, run_dir, options.num, steps, s.prompt if options.prompt is None
                                       else options.prompt, temperature, options.seed, options.device)
        self.write_samples(options.out, texts, show=3)
        logger.info("%d characters in %.2f s (%.0f characters/s)", options.num * cfg.model.seq_len, seconds,
                    options.num * cfg.model.seq_len / seconds)

    def evaluate(self, run_dir: Path, options: BPCEvaluateOptions) -> Evaluation:
        """Held-out BPC (ELBO) with its standard error, the bits per block interval, and samples with their speed;
        with a judge, the samples' perplexity under it and MAUVE of completed held-out windows."""
        for name in ("strata", "repeats"):
            if getattr(options, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(options, name)}")
        if options.windows < 0:
            raise ConfigError(f"--windows must be >= 0 (0: all of them), got {options.windows}")
        if options.mauve_prompts < 0:
            raise ConfigError(f"--mauve-prompts must be at least 0, got {options.mauve_prompts}")
        _check_steps(options.steps)
        model, cfg = from_pretrained(run_dir, options.device)
        data = self.load_run_data(cfg, run_dir)
        L, P = cfg.model.seq_len, options.mauve_prompt_chars
        if options.mauve_prompts > 0 and options.judge.lower() != "none" and not 1 <= P < L:
            raise ConfigError(f"--mauve-prompt-chars must be at least 1 and below model.seq_len={L}, got {P}")
        judge, judge_info, reference = prepare_judging(
            options.judge, cfg, run_dir, data.test, mauve_prompts=options.mauve_prompts, prompt_len=P, new=L - P,
            cache_dir=options.cache_dir, device=options.device, progress=options.progress)
        mauve_on = reference is not None
        windows = held_out_windows(data.test, cfg.model.seq_len)
        windows = windows[:options.windows] if options.windows else windows
        t0 = time.perf_counter()
        r = evaluate_bpc(model, windows, strata=options.strata, repeats=options.repeats, seed=options.seed,
                         device=options.device)
        r["eval_s"] = time.perf_counter() - t0
        steps = (cfg.sample.steps if options.steps is None else options.steps) or cfg.model.seq_len
        num = min(options.num, 16)
        ids, seconds = self._sample_ids(model, cfg, run_dir, num, steps, cfg.sample.prompt, cfg.sample.temperature,
                                        options.seed, options.device)
        texts = [data.vocab.decode(row) for row in ids]
        given = len(data.vocab.encode(cfg.sample.prompt, "sample.prompt")) if cfg.sample.prompt else 0
        generated = [row[given:].tolist() for row in ids]
        r.update({"run": str(run_dir), "num_blocks": cfg.blocks.num_blocks, "sample_steps": steps,
                  "num_samples": num, "sampling_s": seconds, "chars_per_s": num * cfg.model.seq_len / seconds,
                  "partition": [list(model.partition.block_range(b)) for b in range(cfg.blocks.num_blocks)],
                  "samples": texts, "distinct_2": distinct_n(generated, 2), "distinct_4": distinct_n(generated, 4),
                  "longest_run_mean": sum(map(longest_repeated_run, generated)) / num,
                  "longest_run_max": max(map(longest_repeated_run, generated))})
        if judge is not None:
            r["judge"] = judge_info
            # The first character of an unprompted sample has no context: the judge scores those after it.
            r["gen_bits"] = generative_bits(judge, ids, max(given, 1)) / data.test.chars_per_token
            r["gen_ppl"] = 2 ** r["gen_bits"]
        if mauve_on:
            reference_features = features(judge, reference, P)
            r["judge"]["bounds"] = mauve_bounds(judge, data, options.mauve_prompts, P, L - P, seed=options.seed,
                                                reference_features=reference_features)
            t0 = time.perf_counter()
            completed = sample_text(model, options.mauve_prompts, L, steps, prompt=reference[:, :P],
                                    temperature=cfg.sample.temperature, seed=options.seed, device=options.device,
                                    num_tokens=len(data.vocab))
            r["mauve"] = {**text_quality(judge, completed, reference, P, seed=options.seed,
                                         reference_features=reference_features,
                                         chars_per_token=data.test.chars_per_token),
                          "sampling_s": time.perf_counter() - t0}
        return Evaluation(r)

    def evaluation_name(self, cfg: RunConfig, options: BPCEvaluateOptions) -> str:
        return f"eval-bpc-K{options.strata}-R{options.repeats}-seed{options.seed}"

    def format_evaluation(self, r: dict[str, Any]) -> str:
        lines = [f"{r['run']}: B={r['num_blocks']}, held-out BPC {r['bpc']:.4f} {_se_text(r)} (ELBO; "
                 f"{r['num_windows']} windows of {r['seq_len']}, {r['strata']} strata of t, {r['repeats']} repeats)"]
        for b, (bits, (lo, hi)) in enumerate(zip(r["bpc_per_block"], r["partition"])):
            lines.append(f"  block {b} (t {lo:.3g}-{hi:.3g}): {bits:.4f} bits per character")
        if "judge" in r:
            about_judge = bounds_lines(r["judge"])
            about_judge[0] += f"; the samples' perplexity under it {r['gen_ppl']:.2f}"
            lines += about_judge
        if "mauve" in r:
            m = r["mauve"]
            lines.append(f"  MAUVE {m['mauve']:.3f} ({m['num_p']} windows completed after {m['prompt_len']} held-out "
                         f"characters vs their held-out rest, {m['clusters']} clusters), gen. perplexity "
                         f"{m['gen_ppl']:.2f}, distinct-4 {m['distinct_4']:.3f}")
        if "distinct_4" in r:
            lines.append(f"  samples: distinct-2 {r['distinct_2']:.3f}, distinct-4 {r['distinct_4']:.3f}, longest run "
                         f"{r['longest_run_mean']:.1f} (max {r['longest_run_max']})")
        lines.append(f"  sampling: {r['chars_per_s']:.0f} characters/s ({r['sample_steps']} steps); a sample:")
        lines.append("  " + r["samples"][0][:200].replace("\n", "\n  "))
        return "\n".join(lines)

    def write_evaluation(self, out_dir: Path, cfg: RunConfig, evaluation: Evaluation) -> None:
        (out_dir / "samples.txt").write_text("\n\n".join(evaluation.result["samples"]) + "\n", encoding="utf-8")

    def write_comparison(self, out_dir: Path, configs: dict[int, RunConfig], results: dict[int, dict[str, Any]],
                         artifacts: dict[int, Any]) -> None:

        c1, r1 = configs[1], results[1]
        judge, judge_lines = judge_section(configs, results)  # refuses a judge that is one of the runs
        header = ["B", "layers per block", "BPC", "+- SE", "SE windows / draws", "vs B=1", "gen. ppl", "MAUVE",
                  "distinct-4", "train s", "ms/step per block", "peak train mem MiB", "sampling chars/s"]
        rows = [{"B": str(B), "BPC": f"{r['bpc']:.4f}", "+- SE": _number(r["bpc_se"]),
                 "SE windows / draws": f"{_number(r.get('bpc_se_windows'))} / {_number(r.get('bpc_se_draws'))}",
                 "vs B=1": f"{100 * (r['bpc'] / r1['bpc'] - 1):+.1f}%", "sampling chars/s": f"{r['chars_per_s']:.0f}",
                 "gen. ppl": f"{r['gen_ppl']:.2f}" if "gen_ppl" in r else "-",
                 "MAUVE": f"{r['mauve']['mauve']:.3f}" if "mauve" in r else "-",
                 "distinct-4": f"{r['distinct_4']:.3f}" if "distinct_4" in r else "-",
                 **training_cost(configs[B], r)} for B, r in results.items()]
        lines = [f"# End-to-end vs DiffusionBlocks: masked diffusion on {Path(c1.data.path).name}", "",
                 equal_compute(c1, "model (B=1)", f" x {c1.model.seq_len} characters") + ". "
                 f"Model: {c1.model.depth} layers, width {c1.model.hidden_size}, {c1.noise.schedule} alpha(t); "
                 f"{c1.train.schedule} schedule. BPC: the ELBO on {r1['num_windows']} held-out windows, t stratified "
                 f"in {r1['strata']} strata (each evaluated by the block that owns it), the mean of {r1['repeats']} "
                 "independent estimates; its standard error counts both the choice of windows and the estimator's "
                 "draws (the variance over windows of each window's mean bits, over the number of windows), split "
                 f"into the two parts. Sampling: {r1['num_samples']} samples of "
                 f"{c1.model.seq_len} characters, {r1['sample_steps']} unmasking steps, for every B; gen. ppl: their "
                 "perplexity per character under the independent judge (below); MAUVE and distinct-4: of the "
                 "windows completed after held-out prompts (below).", ""] + judge_lines
        lines += markdown_table(header, rows)
        lines += mauve_section(results, judge, [(f"B={B}", r["mauve"]) for B, r in results.items() if "mauve" in r])
        lines += ["", memory_note(r1), "", "## Where the bits go", "",
                  "Bits per character contributed by each block's interval of t (they add up to the BPC; block 0 "
                  "owns the most masked interval).", ""]
        lines += markdown_table(["B", "block", "t range", "bits"], [
            {"B": str(B), "block": str(b), "t range": f"{lo:.3g}-{hi:.3g}", "bits": f"{bits:.4f}"}
            for B, r in results.items() for b, (bits, (lo, hi)) in enumerate(zip(r["bpc_per_block"], r["partition"]))])
        lines += ["", "![BPC vs B](bpc_vs_B.png)", "", "![loss curves](loss_curves.png)", "", "## Samples", ""]
        for B, r in results.items():
            lines += [f"B={B}:", "", "```", *r["samples"][:2], "```", ""]
        (out_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        _plot_bpc(out_dir, results)
        plot_loss_curves(out_dir, configs)


def _plot_bpc(out_dir: Path, results: dict[int, dict[str, Any]]) -> None:
    Bs = list(results)
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.subplots()
    ax.errorbar(Bs, [results[B]["bpc"] for B in Bs], yerr=[results[B]["bpc_se"] for B in Bs], fmt="o-", capsize=3)
    ax.set_xlabel("B (1 = end-to-end)")
    ax.set_xticks(Bs)
    ax.set_ylabel("held-out bits per character")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "bpc_vs_B.png", dpi=110)


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _se_text(r: dict[str, Any]) -> str:
    """The total standard error and its two parts, or why there is none."""
    if r["bpc_se"] is None:
        return "(one window, no standard error)"
    if r.get("bpc_se_draws") is None:
        return f"+- {r['bpc_se']:.4f} (windows and draws; one estimate, so not split)"
    return f"+- {r['bpc_se']:.4f} (windows {r['bpc_se_windows']:.4f}, estimator's draws {r['bpc_se_draws']:.4f})"


def _check_steps(steps: int | None) -> None:
    """--steps follows sample.steps' rule: S >= 0, where 0 means one token per step (S = model.seq_len)."""
    if steps is not None and steps < 0:
        raise ConfigError(f"--steps must be >= 0 (0: model.seq_len steps), got {steps}")
