"""The task interface: everything that differs between the problems DiffusionBlocks is applied to.

The core (noise axes and partitions, preconditioning, samplers, the router, block training and its
schedules, offloading, block-parallel training, checkpoints, run directories, `compare` and the
command's verbs) never asks which task it runs. It calls a `Task`:

- configuration: `config_class`, a `RunConfig` subclass with the task's `model`, `data` and `sample`
  sections (and any of its own); `validate` for rules across sections; `noise_axis`, the axis the
  blocks partition (EDM's sigma by default); `comparison_config`, what `compare` trains for each B
  (the end-to-end baseline at B=1);
- training: `load_data` (train and held-out splits), `load_run_data` (the same as an existing run reads
  them, through its files), `check_after_training` (what a finished run will do with its data, checked
  before any training), `prepare_run` (files of the run besides its blocks), `batch_sampler` (the
  deterministic batches of one block), `build_block` (block b as an `nn.Module` whose `loss(**inputs)`
  returns per-sample losses), `loss_inputs` (those inputs for one batch, drawn from the (seed, block, step) generator)
  and `coupling` (what blocks hand each other, for the rare task whose blocks are not independent);
- after training: `after_training` (what a finished run writes: a sample grid, an evaluation); and
  what a task may do besides, each a protocol it meets by defining its members: `SamplingTask`
  (`sample_options` and `sample`, the `sample` verb), `EvaluatingTask` (`evaluate_options` and
  `evaluate`, the `evaluate` verb and each run of `compare`, with `evaluation_name`,
  `format_evaluation` and `write_evaluation`) and `ComparingTask` (`write_comparison`, `compare`'s
  report). Their options are frozen dataclasses (`diffusionblocks.options`), from which the command
  line makes its flags.

A task is added by subclassing `Task` in any module and naming it in a config as
`"task": "package.module:TaskClass"`, or by `diffusionblocks.tasks.register(name, TaskClass)`.
docs/extending.md walks through a complete example.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ..config import ConfigError, RunConfig
from ..noise import LogNormalSigma, NoiseAxis, Partition
from ..options import EvaluateOptions, SampleOptions
from ..rundir import save_text
from ..text import VOCAB_FILE, WindowSampler, held_out_windows, load_text, load_vocabulary, vocabulary_difference
from ..train import Coupling

logger = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """One evaluation of a trained run: its JSON-able metrics and whatever the task keeps for pictures."""

    result: dict[str, Any]
    artifacts: Any = None


class Task:
    """One kind of problem: its config sections, data, blocks, loss inputs, inference and evaluation.

    Subclasses set `name` and `config_class` and implement the four training methods
    (`load_data`, `batch_sampler`, `build_block`, `loss_inputs`); the rest have defaults.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[RunConfig]] = RunConfig
    noise_symbol: ClassVar[str] = "sigma"       # How the noise axis is called in messages.
    sample_suffixes: ClassVar[tuple[str, ...]] = ()  # Files `sample` can write; () = the task has no samples.

    # ---- configuration

    def default_config(self) -> RunConfig:
        """The config of `diffusionblocks train --task NAME` with no --config."""
        return self.config_class(task=self.name)

    def noise_axis(self, cfg: RunConfig) -> NoiseAxis:
        """The noise axis the blocks partition: EDM's log-normal sigma from cfg.noise by default."""
        n = cfg.noise
        return LogNormalSigma(P_mean=n.P_mean, P_std=n.P_std, sigma_min=n.sigma_min, sigma_max=n.sigma_max)

    def partition(self, cfg: RunConfig) -> Partition:
        """The run's partition of the noise axis into cfg.blocks.num_blocks ranges (method.md section 2)."""
        return Partition(self.noise_axis(cfg), cfg.blocks.num_blocks, kind=cfg.blocks.partition, gamma=cfg.blocks.gamma)

    def comparison_config(self, cfg: RunConfig) -> RunConfig:
        """The run `compare` trains for cfg.blocks.num_blocks blocks (B=1: the end-to-end baseline); default: cfg."""
        return cfg

    # ---- training

    def load_data(self, cfg: RunConfig) -> Any:
        """The data, with `.train` and `.test` splits; raises ConfigError when it does not fit the model."""
        raise NotImplementedError

    def load_run_data(self, cfg: RunConfig, run_dir: Path) -> Any:
        """The data as the existing run `run_dir` reads it (resumed, fine-tuned from, evaluated, composed): through
        the files `prepare_run` wrote into it, such as a vocabulary. Default: `load_data`."""
        return self.load_data(cfg)

    def check_after_training(self, cfg: RunConfig, data: Any) -> None:
        """Raises ConfigError, before any training, when `after_training` could not do its work on this data."""

    def batch_sampler(self, cfg: RunConfig, data: Any, b: int) -> Any:
        """Block b's training batches: an object whose `batch(step)` depends only on (seed, b, step)."""
        raise NotImplementedError

    def build_block(self, cfg: RunConfig, b: int, generator: torch.Generator | None = None) -> nn.Module:
        """Block b of the run, initialised from `generator`; its `loss(**inputs)` returns per-sample losses (N,).

        For inference the block is called as `block(x, noise_level, **cond)` by the router.
        """
        raise NotImplementedError

    def loss_inputs(self, cfg: RunConfig, partition: Partition, b: int, batch: Any,
                    generator: torch.Generator) -> dict[str, Any]:
        """The keyword arguments of block b's `loss` for one batch; every random draw comes from `generator`."""
        raise NotImplementedError

    def prepare_run(self, cfg: RunConfig, run_dir: Path, data: Any) -> None:
        """A run directory is about to be trained into: write what inference will need besides the blocks
        (a vocabulary, say), unless it holds them already (a resumed run's data was read through them).
        Called by the process that writes the run, before training."""

    def coupling(self, cfg: RunConfig, run_dir: Path | None, device: torch.device,
                 trained: dict[int, Any]) -> Coupling:
        """What blocks hand each other during one training session; `trained` maps block -> its BlockState."""
        return Coupling()

    # ---- after training

    def after_training(self, cfg: RunConfig, run_dir: Path, device: torch.device) -> dict[str, Any]:
        """Once every block is trained: write what the run shows (e.g. samples.png); returns summary entries."""
        return {}

    def evaluation_name(self, cfg: RunConfig, options: EvaluateOptions) -> str:
        """The default name of the directory `evaluate` writes into, inside the run directory."""
        return f"eval-n{options.num}-seed{options.seed}"

    def format_evaluation(self, result: dict[str, Any]) -> str:
        """A few readable lines for the terminal."""
        return "\n".join(f"  {k}: {v}" for k, v in result.items() if isinstance(v, (int, float, str)))

    def write_evaluation(self, out_dir: Path, cfg: RunConfig, evaluation: Evaluation) -> None:
        """Files beyond evaluation.json (which the core writes): plots, sample grids."""


# What a task can do after training besides what every task does: each is a protocol that a Task subclass meets by
# defining its members (the core asks `isinstance(task, SamplingTask)`), with the options it takes as a class.


@runtime_checkable
class SamplingTask(Protocol):
    """A task whose runs `diffusionblocks sample` draws from (into a file of one of `sample_suffixes`)."""

    sample_options: type[SampleOptions]  # Its options: SampleOptions and the task's own fields.

    def sample(self, run_dir: Path, model: nn.Module, cfg: RunConfig, options: SampleOptions) -> None:
        """Draws options.num samples from the loaded run `run_dir` and writes options.out."""


@runtime_checkable
class EvaluatingTask(Protocol):
    """A task whose runs `diffusionblocks evaluate` measures."""

    evaluate_options: type[EvaluateOptions]  # Its options: EvaluateOptions and the task's own fields.

    def evaluate(self, run_dir: Path, options: EvaluateOptions) -> Evaluation:
        """Evaluates a trained run; options.device is a device name, resolved."""


@runtime_checkable
class ComparingTask(EvaluatingTask, Protocol):
    """A task that `diffusionblocks compare` can report on: it evaluates each run and writes the report."""

    def write_comparison(self, out_dir: Path, configs: dict[int, RunConfig], results: dict[int, dict[str, Any]],
                         artifacts: dict[int, Any]) -> None:
        """`compare`'s report.md and its plots; results[B] holds the evaluation and its "train_summary"."""


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
        """The samples after training continue sample.prompt, or sample.num held-out prompts of sample.prompt_chars."""
        s = cfg.sample
        if s.num and s.prompt:
            data.vocab.encode(s.prompt, "sample.prompt")
        elif s.num:
            self.held_out_prompts(data.test, s.num, s.prompt_chars, ("sample.num", "sample.prompt_chars"))

    def prepare_run(self, cfg: RunConfig, run_dir: Path, data: Any) -> None:
        """vocab.json: the vocabulary the data was read through (a new run's, or the run's own, left as it is)."""
        path = run_dir / self.VOCAB_FILE
        if not path.is_file() or load_vocabulary(path) != data.vocab:  # differs: a run that never trained, restarted
            save_text(path, data.vocab.to_json())

    def batch_sampler(self, cfg: RunConfig, data: Any, b: int) -> Any:
        return WindowSampler(data, cfg.model.seq_len, cfg.train.batch_size, cfg.train.seed, b)

    def check_judge(self, run_dir: Path, judge: Path) -> None:
        """Refuses a judge (`evaluate --judge`) whose vocabulary maps a token to another id than the run's."""
        difference = vocabulary_difference(Path(run_dir) / self.VOCAB_FILE, Path(judge) / self.VOCAB_FILE)
        if difference is not None:
            raise ConfigError(f"--judge {judge}: its vocabulary is not the run's: {difference}")

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
