"""What the three language tasks share (masked diffusion, the autoregressive LM, recurrent depth): the fields
of their models' configs, the run's vocabulary, training windows, held-out prompts, writing samples and loading the
judge that scores them; and what the two chains of token denoisers share (the autoregressive LM, recurrent depth):
the sample section, the chain likelihood's options, the evaluation windows."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..config import ConfigError, RunConfig, check_choice
from ..models import hf_llama
from ..models.arlm import CausalLM
from ..models.layers import label_embedding_table, take_layers
from ..noise import GRID_NAMES
from ..options import EvaluateOptions, option
from ..pretrained import from_pretrained
from ..rundir import save_text
from ..sampling import SAMPLERS
from ..seeding import make_generator
from ..text import (VOCAB_FILE, TextConfig, WindowSampler, held_out_windows, load_text, load_vocabulary, shared_windows,
                    vocabulary_difference)
from .base import Task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextModelConfig:
    """The fields every language model of the package has; each task's model section extends it."""

    vocab_size: int = 65         # V tokens (tinyshakespeare's characters: 65, text8's: 27); the data may use fewer.
    seq_len: int = 64            # Tokens per training window, and the longest context the model takes.
    hidden_size: int = 128       # Transformer width.
    depth: int = 6               # L, layers of the whole (end-to-end) network.
    num_heads: int = 4           # Attention heads; hidden_size must be a multiple.
    mlp_ratio: float = 4.0       # MLP hidden width / hidden_size.

    # Rotary position embeddings rotate pairs of a head's dimensions: its width must then be even.
    rotary: ClassVar[bool] = False

    def validate(self) -> None:
        for name in ("vocab_size", "seq_len", "hidden_size", "num_heads"):
            if getattr(self, name) < (2 if name in ("vocab_size", "seq_len") else 1):
                raise ConfigError(f"model.{name} is too small: {getattr(self, name)}")
        if self.hidden_size % self.num_heads or (self.rotary and (self.hidden_size // self.num_heads) % 2):
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not a multiple of model.num_heads="
                              f"{self.num_heads}" + (" with an even head width (rotary embeddings rotate pairs)"
                                                     if self.rotary else ""))


@dataclass(frozen=True)
class LlamaModelConfig(TextModelConfig):
    """The fields of the Llama-style trunk (RMSNorm, rotary positions, SwiGLU) the autoregressive and recurrent tasks
    build (`models.arlm.LlamaLayer`)."""

    mlp_multiple: int = 1        # SwiGLU's hidden width, 2/3 * mlp_ratio * hidden_size, rounded to the nearest
                                 # multiple of this (the presets: 16); 1, unrounded, is what configs without it meant.
    rotary = True

    def validate(self) -> None:
        super().validate()
        if self.mlp_multiple < 1:
            raise ConfigError(f"model.mlp_multiple must be at least 1, not {self.mlp_multiple}")


BACKBONES = ("ours", "transformers")


@dataclass(frozen=True)
class BackboneConfig:
    """Which layers make the trunk (the autoregressive and masked-diffusion tasks; `models.hf_llama`)."""

    backbone: str = "ours"       # "ours" or "transformers": transformers' LlamaDecoderLayer with our adaLN around it
                                 # (pip install 'diffusionblocks[hf]').
    pretrained: str = ""         # backbone "transformers": a directory written by LlamaForCausalLM / LlamaModel
                                 # .save_pretrained whose weights (embeddings, layers, final norm, head) start an
                                 # end-to-end (B=1) run; its sizes must be the model section's. A B>1 run keeps it
                                 # only as the record of the run it was converted from.

    def check_backbone(self) -> None:
        check_choice("model.backbone", self.backbone, BACKBONES)
        if self.backbone == "transformers":
            hf_llama.require_transformers()
            if (self.hidden_size // self.num_heads) % 2:
                raise ConfigError(f"model.backbone='transformers' rotates pairs of a head's dimensions: "
                                  f"model.hidden_size={self.hidden_size} / model.num_heads={self.num_heads} is odd")
        elif self.pretrained:
            raise ConfigError("model.pretrained loads a transformers Llama: it needs model.backbone='transformers'")


def check_pretrained_run(cfg: RunConfig) -> None:
    """A cross-section rule of model.pretrained: it starts an end-to-end run; a B>1 run has it only when converted
    from one (train.teacher names the source)."""
    if cfg.model.pretrained and cfg.blocks.num_blocks != 1 and not cfg.train.teacher:
        raise ConfigError(f"model.pretrained starts an end-to-end run (blocks.num_blocks=1), not "
                          f"{cfg.blocks.num_blocks} blocks: train it with B=1, then `diffusionblocks convert` it")


def llama_trunk_config(cfg: RunConfig, b: int, vocab_size: int, intermediate_size: int, max_positions: int):
    """The LlamaConfig of block b's layers: the model section's sizes, or model.pretrained's config (checked against
    them) with block b's depth."""
    m = cfg.model
    depth = cfg.layer_split()[b]
    source = None
    if m.pretrained:
        source = hf_llama.read_llama_config(m.pretrained)
        hf_llama.check_llama_sizes(source, {
            "model.vocab_size": (m.vocab_size, "vocab_size"), "model.hidden_size": (m.hidden_size, "hidden_size"),
            "model.num_heads": (m.num_heads, "num_attention_heads"),
            **({"model.depth": (m.depth, "num_hidden_layers")} if cfg.blocks.num_blocks == 1 else {})}, m.pretrained)
        if source.intermediate_size != intermediate_size:
            raise ConfigError(f"model.pretrained={m.pretrained!r} has intermediate_size={source.intermediate_size} but "
                              f"model.mlp_ratio={m.mlp_ratio} gives a SwiGLU width of {intermediate_size} (2/3 * "
                              f"mlp_ratio * hidden_size, rounded to model.mlp_multiple): set model.mlp_ratio="
                              f"{1.5 * source.intermediate_size / m.hidden_size:g} and model.mlp_multiple=1")
    return hf_llama.llama_config(vocab_size, m.hidden_size, depth, m.num_heads, intermediate_size, max_positions,
                                 source)


def load_pretrained(cfg: RunConfig, b: int, net: torch.nn.Module, trunk: str, norm: str, head: str) -> None:
    """model.pretrained's weights into block b of an end-to-end run (B=1): embeddings, layers, final norm, head."""
    m = cfg.model
    weights = hf_llama.pretrained_weights(m.pretrained)
    tied = bool(getattr(hf_llama.read_llama_config(m.pretrained), "tie_word_embeddings", False))
    named = hf_llama.our_names(weights, trunk, norm, head, m.depth, tied)
    hf_llama.load_into(net, take_layers(named, 0, m.depth), m.pretrained)


def run_token_embedding(cfg: RunConfig) -> torch.Tensor:
    """The run's target table E (V x hidden_size), the same for every block: drawn from (seed, "token-embedding")."""
    return label_embedding_table(cfg.model.vocab_size, cfg.model.hidden_size,
                                 make_generator(cfg.train.seed, "token-embedding"))


@dataclass(frozen=True)
class TextSampleConfig:
    """The sampling fields every language task has; each task's sample section extends it."""

    steps: int = 0               # Sampler steps; 0 = the task's own count (mdlm: seq_len, arlm: B, recurrent: K).
    num: int = 4                 # Samples written to samples.txt after training.
    prompt: str = ""             # A prompt every sample continues (each task says what "" means).
    temperature: float = 1.0     # Softmax temperature of the distribution tokens are drawn from.

    def validate(self) -> None:
        if self.steps < 0 or self.num < 0:
            raise ConfigError("sample.steps and sample.num must be non-negative")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"sample.temperature must be a positive number, got {self.temperature}")


@dataclass(frozen=True)
class TextRunConfig(RunConfig):
    """A language task's config: a text corpus as its data; the task gives its model and sample sections."""

    data: TextConfig = field(default_factory=TextConfig)


class TextTask(Task):
    """The data methods of the language tasks on text (`text.py`): the corpus' splits, checked against
    model.vocab_size; the run's vocabulary, written once into the run and read by everything after; windows of
    model.seq_len drawn per (seed, block, step); held-out prompts."""

    VOCAB_FILE: ClassVar[str] = VOCAB_FILE

    def load_data(self, cfg: RunConfig, vocab: Any = None) -> Any:
        """The corpus, through `vocab` (a run's) or, when None, through a vocabulary made from its training part."""
        data = load_text(cfg.data, cfg.model.seq_len, vocab)
        what = "distinct characters" if cfg.data.tokenizer == "char" else "BPE tokens"
        if len(data.vocab) > cfg.model.vocab_size:
            raise ConfigError(f"data.path {cfg.data.path!r} has {len(data.vocab)} {what} but "
                              f"model.vocab_size={cfg.model.vocab_size}")
        if vocab is None and len(data.vocab) < cfg.model.vocab_size:
            logger.info("data.path %r has %d %s: ids %d..%d of model.vocab_size=%d mean nothing and are never "
                        "sampled", cfg.data.path, len(data.vocab), what, len(data.vocab), cfg.model.vocab_size - 1,
                        cfg.model.vocab_size)
        return data

    def run_vocabulary(self, run_dir: Path) -> Any:
        """The run's vocabulary (its vocab.json): what every id of its blocks means."""
        return load_vocabulary(Path(run_dir) / self.VOCAB_FILE)

    def load_run_data(self, cfg: RunConfig, run_dir: Path) -> Any:
        return self.load_data(cfg, self.run_vocabulary(run_dir))

    def check_after_training(self, cfg: RunConfig, data: Any) -> None:
        """The samples after training continue sample.prompt, or (where the sample section has prompt_chars, as the
        AR and recurrent tasks') sample.num held-out prompts of sample.prompt_chars."""
        self.check_pretrained(cfg)
        s = cfg.sample
        if s.num and s.prompt:
            data.vocab.encode(s.prompt, "sample.prompt")
        elif s.num and hasattr(s, "prompt_chars"):
            self.held_out_prompts(data.test, s.num, s.prompt_chars, ("sample.num", "sample.prompt_chars"))

    def pretrained(self, cfg: RunConfig) -> str | None:
        """model.pretrained (backbone 'transformers'), the saved Llama a fresh end-to-end block starts from."""
        return getattr(cfg.model, "pretrained", "") or None

    def check_pretrained(self, cfg: RunConfig) -> None:
        """model.pretrained of an end-to-end run, read, checked against the model section and loaded into block 0 once
        before anything is trained (a directory without config.json, of another class or other sizes stops here)."""
        if getattr(cfg.model, "pretrained", "") and cfg.blocks.num_blocks == 1:
            self.build_block(cfg, 0, make_generator(cfg.train.seed, 0, "init"))

    def prepare_run(self, cfg: RunConfig, run_dir: Path, data: Any) -> None:
        """vocab.json: the vocabulary the data was read through (a new run's, or the run's own, left as it is)."""
        path = run_dir / self.VOCAB_FILE
        if not path.is_file() or load_vocabulary(path) != data.vocab:  # differs: a run that never trained, restarted
            save_text(path, data.vocab.to_json())

    def batch_sampler(self, cfg: RunConfig, data: Any, b: int) -> Any:
        return WindowSampler(data, cfg.model.seq_len, cfg.train.batch_size, cfg.train.seed, b)

    def load_judge(self, run_dir: Path, judge: str | Path | None, device) -> Any:
        """The plain autoregressive run `judge` (`evaluate --judge`) that scores a run's samples, loaded; None when
        no judge is given. Refuses a chain of denoisers, and a vocabulary that maps a token to another id."""
        if not judge:
            return None
        model, cfg = from_pretrained(judge, device)
        if not isinstance(model.blocks[0], CausalLM):
            raise ConfigError(f"--judge {judge}: a judge is a plain run (task arlm, model.mode='plain'), not a "
                              f"{cfg.blocks.num_blocks}-block chain of {cfg.task!r}")
        difference = vocabulary_difference(Path(run_dir) / self.VOCAB_FILE, Path(judge) / self.VOCAB_FILE)
        if difference is not None:
            raise ConfigError(f"--judge {judge}: its vocabulary is not the run's: {difference}")
        return model

    def after_training(self, cfg: RunConfig, run_dir: Path, device: torch.device) -> dict[str, Any]:
        """samples.txt: the trained run's sample.num samples (`draw_samples`), one per paragraph."""
        if cfg.sample.num == 0:
            return {}
        model, _ = from_pretrained(run_dir, device)
        texts = self.draw_samples(model, cfg, run_dir, device)
        self.write_samples(run_dir / "samples.txt", texts)
        logger.info("samples.txt; the first:\n%s", texts[0])
        return {}

    def draw_samples(self, model, cfg: RunConfig, run_dir: Path, device: torch.device) -> list[str]:
        """The samples after_training writes, decoded."""
        raise NotImplementedError

    def with_run_table(self, net: torch.nn.Module, cfg: RunConfig, generator: torch.Generator | None) -> torch.nn.Module:
        """A denoiser of tokens initialised from generator, with the run's target table E (the same in every block)."""
        net.initialize_weights(generator)
        with torch.no_grad():
            net.E.copy_(run_token_embedding(cfg))
        return net

    def write_samples(self, path: Path, texts: list[str], show: int = 0) -> None:
        """Samples as text, one per paragraph; the first `show` are printed too."""
        Path(path).write_text("\n\n".join(texts) + "\n", encoding="utf-8")
        for text in texts[:show]:
            print(text, end="\n\n")

    def held_out_prompts(self, test: Any, num: int, length: int, names: tuple[str, str]) -> torch.Tensor:
        """num prompts (num, length): the starts of num held-out windows of `length` tokens, spread over the held-out
        text; names: the options that set num and length, for the message when there are too few."""
        windows = held_out_windows(test, length)
        if len(windows) < num:
            raise ConfigError(f"the held-out text has {len(windows)} windows of {names[1]}={length} tokens, fewer "
                              f"than {names[0]}={num} prompts")
        return windows[::len(windows) // num][:num]

    def prompts(self, cfg: RunConfig, run_dir: Path, num: int, prompt: str | None, length: int) -> torch.Tensor:
        """num prompts (num, P): the one given, or held-out prompts of `length` tokens (`held_out_prompts`)."""
        if prompt:
            return self.run_vocabulary(run_dir).encode(prompt, "the prompt")[None].expand(num, -1)
        return self.held_out_prompts(self.load_run_data(cfg, run_dir).test, num, length,
                                     ("--num", "sample.prompt_chars"))


# ---- what the chains of token denoisers share (the autoregressive and recurrent-depth tasks)

BRIDGES = ("estimate", "softmax", "argmax", "sample")


@dataclass(frozen=True)
class ChainSampleConfig(TextSampleConfig):
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


def readout_settings(cfg: RunConfig, temperature: float | None = None, top_p: float | None = None,
                     greedy: bool = False) -> dict[str, Any]:
    """The readout of the run's sample section, with the options given (None: the run's) in its place."""
    s = cfg.sample
    t = s.temperature if temperature is None else temperature
    p = s.top_p if top_p is None else top_p
    dataclasses.replace(s, temperature=t, top_p=p).validate()
    return {"temperature": t, "top_p": p, "greedy": s.greedy or greedy}


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
                              "CPU; on an accelerator, whose kernels want wide batches, as many as make 2^27 "
                              "activations of a layer's input, 16384 chains of 64 x 128)")

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


def evaluation_windows(test, seq_len: int, num: int) -> torch.Tensor:
    """The windows the bits are measured on: `num` spread evenly over the held-out split (shared_windows), 0 = all."""
    return shared_windows(test, seq_len, num) if num else held_out_windows(test, seq_len)


def per_character(r: dict[str, Any], chars_per_token: float) -> dict[str, Any]:
    """A LikelihoodTally result with its figures per character added (bpc, bpc_se, bpc_se_estimator, bpc_bias)."""
    names = {"bits": "bpc", "se": "bpc_se", "se_estimator": "bpc_se_estimator", "bias": "bpc_bias",
             "fall": "bpc_fall"}
    return {**r, **{name: r[k] / chars_per_token for k, name in names.items()}}


def check_windows(windows: int) -> None:
    """--windows follows its rule: N >= 0, where 0 means every held-out window."""
    if windows < 0:
        raise ConfigError(f"--windows must be >= 0 (0: all of them), got {windows}")
