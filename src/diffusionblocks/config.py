"""Run configuration: frozen dataclasses that round-trip through JSON.

The JSON describes *what* is trained (model, noise, blocks, data, optimisation, sampling);
command-line flags describe *how this process* runs it (device, output directory, resume).
This module holds the sections every task shares (blocks, train, and EDM's noise levels, or a model's own
parameterization of them: `ParameterizedNoiseConfig`); each task defines its own model, data and sample sections
(`diffusionblocks.tasks`).
Unknown keys and values of the wrong type are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError

# The partitions of the noise axis (noise.Partition's kinds).
PARTITIONS = ("equiprobable", "uniform", "balanced")
DENSITIES = ("train", "fitted")  # blocks.density: where each block draws its training noise levels

__all__ = ["BlocksConfig", "ConfigError", "NoiseConfig", "PARAMETERIZATIONS", "PARTITIONS", "ParameterizedNoiseConfig",
           "PRECISIONS", "RunConfig", "TrainConfig", "check_choice", "even_split", "overridden", "read_config_file",
           "switched_task", "shown_path"]

PRECISIONS = ("auto", "fp32", "tf32", "bf16")


@dataclass(frozen=True)
class NoiseConfig:
    """EDM's Gaussian noise levels and their training density (method.md section 1)."""

    P_mean: float = -1.2         # Mean of ln(sigma) under the training density (EDM).
    P_std: float = 1.2           # Std of ln(sigma) under the training density.
    sigma_min: float = 0.002     # Lowest noise level, trained and sampled.
    sigma_max: float = 80.0      # Highest noise level; sampling starts from sigma_max * eps.
    sigma_data: float = 0.5      # Expected std of the data.

    def validate(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError(f"noise needs 0 < sigma_min < sigma_max, got {self.sigma_min} and {self.sigma_max}")
        if self.P_std <= 0 or self.sigma_data <= 0:
            raise ConfigError("noise.P_std and noise.sigma_data must be positive")


PARAMETERIZATIONS = ("edm", "flow", "vp-eps")


@dataclass(frozen=True)
class ParameterizedNoiseConfig(NoiseConfig):
    """Gaussian noise levels under the model's own parameterization (`diffusionblocks.parameterizations`): EDM's
    (the default: preconditioning, log-normal sigma), rectified flow's (SD3, Flux) or DDPM's (DiT). Each field
    below the first applies to one parameterization; P_mean, P_std and sigma_data to "edm" only, sigma_min and
    sigma_max to "edm" and "flow" (a "vp-eps" axis spans its timesteps' noise levels)."""

    parameterization: str = "edm"   # "edm", "flow" (predicts v = eps - y at x_t = (1 - t) y + t eps) or "vp-eps"
                                    # (predicts eps at x_t = sqrt(alpha_bar) y + sqrt(1 - alpha_bar) eps).
    time_density: str = "logit-normal"  # flow: training density of t before the shift, "logit-normal" or "uniform".
    logit_mean: float = 0.0         # flow: m of logit(t) ~ N(m, s^2) (SD3: 0).
    logit_std: float = 1.0          # flow: s (SD3: 1).
    shift: float = 1.0              # flow: SD3's timestep shift t' = shift t / (1 + (shift - 1) t); 1 = none.
    timestep_scale: float = 1000.0  # flow: the network's time input is t * timestep_scale (diffusers: 1000).
    num_timesteps: int = 1000       # vp-eps: T, timesteps 0..T-1.
    beta_start: float = 1e-4        # vp-eps: betas linear from beta_start...
    beta_end: float = 0.02          # vp-eps: ...to beta_end (DDPM's).

    OWN_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "flow": ("time_density", "logit_mean", "logit_std", "shift", "timestep_scale"),
        "vp-eps": ("num_timesteps", "beta_start", "beta_end")}

    def validate(self) -> None:
        super().validate()
        check_choice("noise.parameterization", self.parameterization, PARAMETERIZATIONS)
        check_choice("noise.time_density", self.time_density, ("logit-normal", "uniform"))
        for name in ("logit_std", "shift", "timestep_scale"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"noise.{name} must be positive, got {getattr(self, name)}")
        if self.num_timesteps < 2:
            raise ConfigError(f"noise.num_timesteps must be at least 2, got {self.num_timesteps}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ConfigError(f"noise needs 0 < beta_start <= beta_end < 1, got {self.beta_start} and {self.beta_end}")
        default = type(self)()
        for parameterization, names in self.OWN_FIELDS.items():
            changed = [n for n in names if getattr(self, n) != getattr(default, n)]
            if changed and parameterization != self.parameterization:
                raise ConfigError(f"noise.{changed[0]}={getattr(self, changed[0])!r} applies to "
                                  f"noise.parameterization={parameterization!r} only, not to "
                                  f"{self.parameterization!r}: remove it or set the parameterization")


@dataclass(frozen=True)
class BlocksConfig:
    num_blocks: int = 3                    # B. B = 1 is ordinary end-to-end diffusion training.
    partition: str = "equiprobable"        # "equiprobable" (equal training mass), "uniform" (equal width in ln sigma)
                                           # or "balanced" (equal shares of what remains undecided, fitted by a pilot).
    gamma: float = 0.05                    # Overlap: each block trains on its range widened by gamma of its log-width.
    layers_per_block: tuple[int, ...] | None = None  # Explicit split of model.depth; None = even split.
    boundaries: tuple[float, ...] | None = None  # "balanced": the B - 1 fitted inner boundaries, ascending; None
                                                 # until the pilot writes them into the run's config.
    pilot_steps: int = 0                   # "balanced": the pilot's end-to-end steps (0: train.steps_per_block / 4).
    pilot_levels: int = 24                 # "balanced": noise levels the pilot's curve is measured at.
    pilot_examples: int = 512              # "balanced": held-out examples measured at each level.
    density: str = "train"                 # Each block's training levels: "train" (the task's training density
                                           # truncated to its range) or "fitted" ("balanced" only: the density of the
                                           # pilot's fitted curve, each stretch as likely as the share it decides).
    curve: tuple[tuple[float, float], ...] | None = None  # "balanced": the pilot's fitted curve, (level, remaining)
                                                          # knots ascending; written with the boundaries.


LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class TrainConfig:
    schedule: str = "sequential"     # "sequential" (block 0 to the end, then block 1...), "interleaved" (a random
                                     # block each step) or "parallel" (blocks at once on torchrun's ranks).
    steps_per_block: int = 1200      # Optimiser steps each block receives (equal compute: = end-to-end steps).
    batch_size: int = 128            # Examples per step.
    lr: float = 1e-3                 # AdamW learning rate.
    lr_warmup_steps: int = 100       # Linear warm-up of each block's learning rate.
    lr_schedule: str = "constant"    # After the warm-up: "constant", or a decay over each block's remaining steps to
                                     # lr_final * lr at its last step, "cosine" (as nanoGPT, Chinchilla) or "linear".
    lr_final: float = 0.1            # The decays' last learning rate, a fraction of lr (unused when constant).
    lr_decay_steps: int = 0          # The decays' length, ending at the last step; constant before (warm-up, stable,
                                     # decay: a cool-down); 0 = every step after the warm-up.
    weight_decay: float = 0.0        # AdamW weight decay (matrices only).
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0           # Max global grad norm per block; 0 = off.
    ema_halflife_steps: float = 0.0  # Half-life of the weights' EMA, in steps; 0 = no EMA.
    seed: int = 0                    # Every random stream derives from (seed, block, step).
    log_every: int = 50              # Steps between metrics lines (per block).
    checkpoint_every: int = 500      # Steps between checkpoints (per block); the end is always saved.
    activation_checkpointing: bool = False  # Recompute each layer's activations in the backward pass (~1/L memory).
    precision: str = "auto"          # Matmul precision: "fp32", "tf32" (CUDA), "bf16" (autocast; weights, optimiser
                                     # state, EMA and the loss stay float32), or "auto" (bf16 on CUDA, fp32 on CPU).
    compile: bool = False            # torch.compile each block's loss (pays off on GPUs; compiling takes a while).
    data_on_device: str = "auto"     # "on": the training data lives on the device and each step's batch and draws
                                     # are made there (no copy, no wait for the host); "off": on the host; "auto":
                                     # on for a CUDA device when the data takes at most a quarter of its memory.
    blocks_to_train: tuple[int, ...] | None = None  # The blocks a train command trains when --blocks is not given
                                     # (each machine of a run split over machines its own); None: every block.
    distill_weight: float = 0.0      # Weight of the distance to the teacher's denoised output in each block's loss.
    teacher: str | None = None       # The end-to-end (B=1) run distilled from when distill_weight > 0 (convert sets
                                     # it to the run it converted).

    def validate(self) -> None:
        check_choice("train.schedule", self.schedule, ("sequential", "interleaved", "parallel"))
        check_choice("train.precision", self.precision, PRECISIONS)
        check_choice("train.data_on_device", self.data_on_device, ("auto", "on", "off"))
        check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if not 0 <= self.lr_final <= 1:
            raise ConfigError(f"train.lr_final is a fraction of train.lr in [0, 1], got {self.lr_final}")
        for name in ("steps_per_block", "batch_size", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError(f"train.betas must both be in [0, 1), got {list(self.betas)}")
        for name in ("lr_warmup_steps", "lr_decay_steps", "weight_decay", "grad_clip", "ema_halflife_steps",
                     "distill_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_schedule != "constant" and self.lr_warmup_steps >= self.steps_per_block:
            raise ConfigError(f"train.lr_schedule={self.lr_schedule!r} decays after the warm-up: train.lr_warmup_steps="
                              f"{self.lr_warmup_steps} leaves none of train.steps_per_block={self.steps_per_block}")
        if self.distill_weight > 0 and not self.teacher:
            raise ConfigError(f"train.distill_weight={self.distill_weight} needs train.teacher, the end-to-end run "
                              "to distill from")


@dataclass(frozen=True)
class RunConfig:
    """The whole configuration of a run: the sections every task shares, and the task's own.

    The core reads `blocks`, `train`, `model.depth` (the number of layers L that the blocks split) and
    the names; the task reads everything else. A task's config is a subclass of this class that gives
    `model`, `data` and `sample` (and `noise`, and any section of its own) the task's dataclasses as
    types and defaults; `task` names the task (see `diffusionblocks.tasks`), which says which subclass
    a JSON file is read into.
    """

    name: str = "run"
    task: str = ""               # A registered task ("generate", "classify"...) or "package.module:TaskClass".
    model: Any = None            # The task's network: must have `depth`, the number of layers L.
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    blocks: BlocksConfig = field(default_factory=BlocksConfig)
    data: Any = None             # The task's data.
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: Any = None           # The task's inference settings.

    # Fields of the task's own sections that `train --resume` may change (how the run is used, not what it is),
    # besides those every task's may (diffusionblocks.changes.MAY_CHANGE).
    resumable_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def upgrade_config(cls, d: dict[str, Any]) -> dict[str, Any]:
        """A config dict as an older version of this class wrote it, in today's form (default: unchanged)."""
        return d

    def to_dict(self) -> dict[str, Any]:
        """Every field, but for the sections the task does not define (typed Any and left None)."""
        hints = typing.get_type_hints(type(self))
        return {k: v for k, v in dataclasses.asdict(self).items() if not (v is None and hints[k] is Any)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """This config class built from d (parsed JSON), every field checked; the registry's
        `diffusionblocks.tasks.config_from_dict` picks the class from d["task"]."""
        if cls is RunConfig:
            raise TypeError("RunConfig.from_dict needs the task's config class; diffusionblocks.tasks.config_from_dict "
                            "picks it from the task the dict names")
        cfg = _build(cls, cls.upgrade_config(d), "")
        cfg.validate()
        return cfg

    def layer_split(self) -> tuple[int, ...]:
        """Layers of each block, block 0 first (the first layers of the network)."""
        B, L = self.blocks.num_blocks, self.model.depth
        if self.blocks.layers_per_block is not None:
            return tuple(self.blocks.layers_per_block)
        return (L // B,) * B

    def validate(self) -> None:
        """Checks every section (its own `validate`) and the layer split; a task's config class adds its rules across
        sections by extending this method."""
        if type(self) is RunConfig or self.model is None:
            raise ConfigError("a run's config is its task's RunConfig subclass, with a model section: make one with "
                              "diffusionblocks.tasks.default_config(task) or diffusionblocks.tasks.config_from_dict")

        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section) and hasattr(section, "validate"):
                section.validate()
        b = self.blocks
        check_choice("blocks.partition", b.partition, PARTITIONS)
        if b.boundaries is not None:
            s = list(b.boundaries)
            if b.partition != "balanced":
                raise ConfigError(f"blocks.boundaries are a fitted partition's; blocks.partition is {b.partition!r}")
            if len(s) != b.num_blocks - 1 or any(lo >= hi for lo, hi in zip(s, s[1:])):
                raise ConfigError(f"blocks.boundaries {s} must be blocks.num_blocks - 1 = {b.num_blocks - 1} "
                                  "ascending noise levels")
        check_choice("blocks.density", b.density, DENSITIES)
        if (b.density == "fitted" or b.curve is not None) and b.partition != "balanced":
            raise ConfigError(f"blocks.density='fitted' and blocks.curve are a fitted partition's; blocks.partition is "
                              f"{b.partition!r}")
        if b.curve is not None and (len(b.curve) < 2 or any(lo[0] >= hi[0] or lo[1] > hi[1]
                                                             for lo, hi in zip(b.curve, b.curve[1:]))):
            raise ConfigError("blocks.curve must be at least two (level, remaining) knots, levels ascending and "
                              "remaining non-decreasing")
        for name, value, least in [("blocks.pilot_steps", b.pilot_steps, 0), ("blocks.pilot_levels", b.pilot_levels, 4),
                                   ("blocks.pilot_examples", b.pilot_examples, 1)]:
            if value < least:
                raise ConfigError(f"{name} must be at least {least}, got {value}")
        for name, value in [("model.depth", self.model.depth), ("blocks.num_blocks", b.num_blocks)]:
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if not 0 <= b.gamma < 1:
            raise ConfigError(f"blocks.gamma must be in [0, 1), got {b.gamma}")
        chosen = self.train.blocks_to_train
        if chosen is not None and (not chosen or len(set(chosen)) != len(chosen)
                                   or not all(0 <= k < b.num_blocks for k in chosen)):
            raise ConfigError(f"train.blocks_to_train={list(chosen)} must name distinct blocks among "
                              f"0..{b.num_blocks - 1}")
        L = self.model.depth
        if b.num_blocks > L:
            raise ConfigError(f"blocks.num_blocks={b.num_blocks} is larger than the number of layers model.depth={L}")
        if b.layers_per_block is None:
            if L % b.num_blocks:
                raise ConfigError(
                    f"model.depth={L} layers do not split evenly into blocks.num_blocks={b.num_blocks}; "
                    f"give blocks.layers_per_block explicitly (e.g. {list(even_split(L, b.num_blocks))})")
        else:
            split = b.layers_per_block
            if len(split) != b.num_blocks:
                raise ConfigError(f"blocks.layers_per_block has {len(split)} entries but blocks.num_blocks={b.num_blocks}")
            if any(k < 1 for k in split):
                raise ConfigError(f"blocks.layers_per_block {list(split)} has a block with no layer")
            if sum(split) != L:
                raise ConfigError(f"blocks.layers_per_block {list(split)} adds up to {sum(split)} layers "
                                  f"but model.depth={L}")


def shown_path(path: str | Path) -> str:
    """A path for a message: a relative one says where it was looked for (data paths in a config are taken
    relative to the working directory, not to the config file, so that presets/ can name ../shared/data)."""
    path = Path(path)
    return repr(str(path)) if path.is_absolute() else f"{str(path)!r} (relative to the working directory {str(Path.cwd())!r})"


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def even_split(L: int, B: int) -> tuple[int, ...] | None:
    """blocks.layers_per_block for L layers in B blocks: None when they split evenly, else the most even explicit
    split (earlier blocks larger)."""
    return None if L % B == 0 else tuple(L // B + (1 if i < L % B else 0) for i in range(B))


def _build(cls: type, d: Any, prefix: str) -> Any:
    """Builds dataclass `cls` from dict `d`, checking field names and types."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown field '{prefix}{unknown[0]}' in {where} (known: {', '.join(fields)})")
    kwargs = {k: _coerce(hints[k], _with_section_defaults(fields[k], v), prefix + k) for k, v in d.items()}
    return cls(**kwargs)


def _with_section_defaults(f: dataclasses.Field, value: Any) -> Any:
    """A section given in part takes its missing fields from the config's own default for the section (a
    task's config may set defaults of its own, e.g. the main job's batch size), not from the section class."""
    if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    if not dataclasses.is_dataclass(default):
        return value
    return {**{g.name: getattr(default, g.name) for g in dataclasses.fields(default)}, **value}


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Checks `value` (parsed JSON) against type hint `tp`; returns it converted (lists to tuples...)."""
    if tp is Any:  # a section the task does not define
        if value is not None:
            raise ConfigError(f"section {name!r} means nothing to this task (it must be null or absent)")
        return None
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name + ".")
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name)
    if origin is dict:  # a JSON object kept as it is (another library's config, e.g. a diffusers model's)
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a JSON object, got {value!r}")
        return json.loads(json.dumps(value))
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, name) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{name} must have {len(args)} entries, got {value!r}")
        return tuple(_coerce(a, v, name) for a, v in zip(args, value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {name}")


def switched_task(d: dict[str, Any], d_default: dict[str, Any], new_default: dict[str, Any]) -> dict[str, Any]:
    """new_default (a config dict of another task) with the fields d set away from its own task's defaults
    (d_default) carried over where the new task has them: a dataset, a seed, a name."""
    new = json.loads(json.dumps(new_default))  # a deep copy

    def carry(into: dict, given: dict, default: dict) -> None:
        for k, v in given.items():
            if k not in into or k == "task":
                continue
            if isinstance(v, dict) and isinstance(into[k], dict) and isinstance(default.get(k), dict):
                carry(into[k], v, default[k])
            elif not isinstance(into[k], dict) and v != default.get(k):
                into[k] = v

    carry(new, d, d_default)
    return new


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The JSON object of a config file, before it is checked (`diffusionblocks.tasks.load_config` checks it)."""
    path = Path(path)
    if path.is_dir():
        hint = (f" (the config of that run is {str(path / 'config.json')!r}; `train --resume {path}` continues it)"
                if (path / "config.json").is_file() else "")
        raise ConfigError(f"config file {str(path)!r} is a directory, not a JSON file{hint}")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {e}") from None


def overridden(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Config dict d with `section.field=value` overrides set (values parsed as JSON, else taken as strings);
    `task=...` is set like any field (`diffusionblocks.tasks.apply_overrides` switches the task first)."""
    d = json.loads(json.dumps(d))  # a deep copy
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *path, last = key.split(".")
        node = d
        for i, part in enumerate(path):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {item!r}: unknown section {'.'.join(path[:i + 1])!r}")
            node = node[part]
        if last not in node:
            raise ConfigError(f"override {item!r}: unknown field {key!r}")
        node[last] = value
    return d
