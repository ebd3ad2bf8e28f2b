"""The task interface: everything that differs between the problems DiffusionBlocks is applied to.

The core (noise axes and partitions, preconditioning, samplers, the router, block training and its
schedules, offloading, block-parallel training, checkpoints, run directories, `compare` and the
command's verbs) never asks which task it runs. It calls a `Task`:

- configuration: `config_class`, a `RunConfig` subclass with the task's `model`, `data` and `sample`
  sections (and any of its own, each checked by its config class); `noise_axis`, the axis the blocks
  partition (EDM's sigma by default), and `partition`, its ranges; `comparison_config`, what `compare`
  trains for each B (the end-to-end baseline at B=1);
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

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ..config import ConfigError, RunConfig
from ..models.layers import take_layers
from ..noise import LogNormalSigma, NoiseAxis, Partition
from ..options import EvaluateOptions, SampleOptions
from ..precond import loss_weight
from ..train import Coupling


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
        """The run's partition of the noise axis into cfg.blocks.num_blocks ranges (method.md section 2); a "balanced"
        one from the boundaries its pilot recorded in the run's config (`pilot.fit_partition`)."""
        b = cfg.blocks
        fitted = None
        if b.partition == "balanced":
            fitted = () if b.num_blocks == 1 else b.boundaries
            if fitted is None:
                raise ConfigError("blocks.partition='balanced' has no fitted boundaries yet: `train` fits them with a "
                                  "pilot run before the blocks train (blocks.pilot_steps)")
        try:
            curve = None
            if b.density == "fitted" and b.num_blocks > 1:
                if b.curve is None:
                    raise ConfigError("blocks.density='fitted' has no fitted curve yet: `train` records it with the "
                                      "boundaries after the pilot")
                curve = tuple(b.curve)
            return Partition(self.noise_axis(cfg), b.num_blocks, kind=b.partition, gamma=b.gamma,
                             fitted=None if fitted is None else tuple(fitted), curve=curve)
        except ValueError as e:
            raise ConfigError(f"blocks.boundaries: {e}") from None

    def remaining_measure(self, cfg: RunConfig) -> str | None:
        """What a "balanced" partition's pilot measures at each noise level: "cross-entropy" (discrete targets: the
        bits still undecided), "mmse" (continuous targets: the denoising error, integrated into the information still
        to be revealed, `pilot.information_to_reveal`), or None where the task has no fitted partition."""
        return None

    def undecided(self, cfg: RunConfig, block: nn.Module, inputs: dict[str, Any], level: float) -> torch.Tensor:
        """Per example (N,), what block (a pilot over the whole axis) leaves undecided on `inputs`, drawn by
        `loss_inputs` at the one noise level `level`: by default its loss without the weight lambda(level), the
        cross-entropy or squared error of an EDM-weighted loss."""
        return block.loss(**inputs).double() / float(loss_weight(torch.tensor(level, dtype=torch.float64),
                                                                  block.sigma_data))

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

    # ---- blocks from a trained model (`diffusionblocks convert`, method.md section 8)

    def pretrained(self, cfg: RunConfig) -> str | None:
        """The model directory whose weights block 0 of cfg is built from (`build_block` loads them), which
        `diffusionblocks import` makes an end-to-end run of; None (the default): blocks start from random weights."""
        return None

    def split_weights(self, cfg: RunConfig, weights: dict[str, torch.Tensor], first: int,
                      last: int) -> dict[str, torch.Tensor]:
        """The weights of a block made of layers [first, last) of the end-to-end run of config cfg (B=1), whose one
        block holds `weights`, with its own copies of the rest (embeddings, embedders, head); raises ConfigError
        when such a run is not a chain of denoisers of this task's blocks (default: no task's runs are)."""
        raise ConfigError(f"task {self.name!r} cannot convert its runs into blocks: its end-to-end run is not a "
                          "denoiser of the same architecture as its blocks")

    def distills(self, cfg: RunConfig) -> bool:
        """Whether the blocks of cfg can learn a teacher's denoised output (`distillation_inputs`); default: no."""
        return False

    def distillation_inputs(self, cfg: RunConfig, teacher: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """What block loss inputs `inputs` gain so that the block's loss adds train.distill_weight times the distance
        to the teacher's denoised output at the same noisy input and noise level (the caller runs it without
        gradient)."""
        raise ConfigError(f"task {self.name!r} has no distillation: train.distill_weight must be 0")

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


def layers_of_denoiser(cfg: RunConfig, weights: dict[str, torch.Tensor], first: int, last: int,
                       plain: str) -> dict[str, torch.Tensor]:
    """`Task.split_weights` of a task whose model.mode='plain' end-to-end run is a `plain` network (a classifier, a
    causal LM) rather than a denoiser of its blocks' architecture: such a run is refused, a denoiser split."""
    if cfg.model.mode == "plain":
        raise ConfigError(f"a model.mode='plain' run is a plain {plain}, not a denoiser of the blocks' architecture: "
                          "it cannot be converted into blocks (train a model.mode='diffusion' run)")
    return take_layers(weights, first, last)


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
