"""Run configuration: frozen dataclasses that round-trip through JSON.

The JSON describes *what* is trained (model, noise, blocks, data, optimisation, sampling);
command-line flags describe *how this process* runs it (device, output directory, resume).
Unknown keys and values of the wrong type are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration, data path, checkpoint or argument that cannot be used, with a message naming it."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "dit"            # Denoiser architecture; "dit" is the one image architecture so far.
    image_size: int = 8          # Height = width of the images, in pixels.
    in_channels: int = 1         # Image channels.
    patch_size: int = 2          # Side of a square patch; image_size must be a multiple.
    hidden_size: int = 128       # Transformer width.
    depth: int = 6               # L, the number of transformer layers of the whole (end-to-end) network.
    num_heads: int = 4           # Attention heads; hidden_size must be a multiple.
    mlp_ratio: float = 4.0       # MLP hidden width / hidden_size.
    num_classes: int = 10        # Classes for conditioning; 0 = unconditional. Index num_classes is the null class.
    class_dropout: float = 0.1   # Probability of replacing a training label by the null class (for guidance).


@dataclass(frozen=True)
class NoiseConfig:
    P_mean: float = -1.2         # Mean of ln(sigma) under the training density (EDM).
    P_std: float = 1.2           # Std of ln(sigma) under the training density.
    sigma_min: float = 0.002     # Lowest noise level, trained and sampled.
    sigma_max: float = 80.0      # Highest noise level; sampling starts from sigma_max * eps.
    sigma_data: float = 0.5      # Expected std of the data.


@dataclass(frozen=True)
class BlocksConfig:
    num_blocks: int = 3                    # B. B = 1 is ordinary end-to-end diffusion training.
    partition: str = "equiprobable"        # "equiprobable" (equal training mass) or "uniform" (equal width in ln sigma).
    gamma: float = 0.05                    # Overlap: each block trains on its range widened by gamma of its log-width.
    layers_per_block: tuple[int, ...] | None = None  # Explicit split of model.depth; None = even split.


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"      # "digits" (scikit-learn, embedded), "mnist" (IDX files), "cifar10" or "cifar100".
    root: str | None = None      # Directory of the dataset files (mnist, cifar10, cifar100).
    download: bool = False       # Fetch the standard files into root when they are missing.
    split: str = "train"         # Which files to train on: "train", or "test" to train on part of the test files.
    holdout: int = 0             # Images held out of the training split for evaluation (0 = dataset default).
    hflip: bool = False          # Random horizontal flips during training (natural images only).
    crop_padding: int = 0        # Random crops: pad by this many pixels (edge copies), crop back; 0 = off.


@dataclass(frozen=True)
class TrainConfig:
    schedule: str = "sequential"     # "sequential" (block 0 to the end, then block 1...), "interleaved" (a random
                                     # block each step) or "parallel" (blocks at once on torchrun's ranks).
    steps_per_block: int = 1200      # Optimiser steps each block receives (equal compute: = end-to-end steps).
    batch_size: int = 128            # Images per step.
    lr: float = 1e-3                 # AdamW learning rate.
    lr_warmup_steps: int = 100       # Linear warm-up of each block's learning rate.
    weight_decay: float = 0.0        # AdamW weight decay (matrices only).
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0           # Max global grad norm per block; 0 = off.
    ema_halflife_steps: float = 0.0  # Half-life of the weights' EMA, in steps; 0 = no EMA.
    seed: int = 0                    # Every random stream derives from (seed, block, step).
    log_every: int = 50              # Steps between metrics lines (per block).
    checkpoint_every: int = 500      # Steps between checkpoints (per block); the end is always saved.
    activation_checkpointing: bool = False  # Recompute each layer's activations in the backward pass (~1/L memory).


@dataclass(frozen=True)
class SampleConfig:
    sampler: str = "euler"           # "euler" (the paper's), "heun" (EDM Alg. 1) or "dpmpp_2m".
    steps: int = 50                  # Denoising steps (network evaluations per sample for Euler).
    grid: str = "quantile"           # "quantile" (equal mass, the paper's) or "karras" (rho schedule).
    rho: float = 7.0                 # Karras schedule exponent.
    guidance: float = 2.0            # Classifier-free guidance weight w; 1 = no guidance.
    samples_per_class: int = 10      # Columns of the sample grid written after training.


@dataclass(frozen=True)
class ClassifyConfig:
    """Classification by label denoising (method.md section 5); used when task = "classify"."""

    mode: str = "diffusion"               # "diffusion" (blocks denoise the label embedding) or "plain" (the
                                          # end-to-end baseline: the same ViT as an ordinary classifier, B = 1).
    label_embedding: str = "fixed"        # "fixed": a random orthonormal table frozen from the seed, so blocks
                                          # are independent (any schedule); "learned_first": learned with block 0,
                                          # then frozen for the others (sequential); "learned_joint": one table
                                          # learned by whichever block runs (interleaved; the reference code's).
    loss_weighting: str = "per_sample"    # "per_sample": lambda(sigma_i) CE_i; "batch_mean": mean(lambda) CE_i,
                                          # the reference code's.
    inference_steps: int = 0              # Denoising steps at inference; 0 = B (each block once).


@dataclass(frozen=True)
class RunConfig:
    name: str = "digits-dit"
    task: str = "generate"       # "generate" (class-conditional images, DiT) or "classify" (labels, ViT).
    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    blocks: BlocksConfig = field(default_factory=BlocksConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        cfg = _build(cls, d, "")
        cfg.validate()
        return cfg

    def layer_split(self) -> tuple[int, ...]:
        """Layers of each block, block 0 first (the first layers of the network)."""
        B, L = self.blocks.num_blocks, self.model.depth
        if self.blocks.layers_per_block is not None:
            return tuple(self.blocks.layers_per_block)
        return (L // B,) * B

    def validate(self) -> None:
        m, n, b, d, t, s = self.model, self.noise, self.blocks, self.data, self.train, self.sample
        _choice("task", self.task, ("generate", "classify"))
        _choice("model.arch", m.arch, ("dit",) if self.task == "generate" else ("vit",))
        c = self.classify
        _choice("classify.mode", c.mode, ("diffusion", "plain"))
        _choice("classify.label_embedding", c.label_embedding, ("fixed", "learned_first", "learned_joint"))
        _choice("classify.loss_weighting", c.loss_weighting, ("per_sample", "batch_mean"))
        if self.task == "classify":
            if c.mode == "plain" and b.num_blocks != 1:
                raise ConfigError(f"classify.mode='plain' is the end-to-end baseline: it needs blocks.num_blocks=1, "
                                  f"got {b.num_blocks}")
            if c.label_embedding == "learned_joint" and b.num_blocks > 1 and t.schedule != "interleaved":
                raise ConfigError("classify.label_embedding='learned_joint' is shared by the blocks: it needs "
                                  f"train.schedule='interleaved', got {t.schedule!r} (use 'fixed' or "
                                  "'learned_first' for independent blocks)")
            if c.label_embedding == "learned_first" and b.num_blocks > 1 and t.schedule != "sequential":
                raise ConfigError("classify.label_embedding='learned_first' needs block 0 trained before the "
                                  f"others: it needs train.schedule='sequential', got {t.schedule!r} (use 'fixed')")
            if m.num_classes < 2:
                raise ConfigError(f"classification needs model.num_classes >= 2, got {m.num_classes}")
        _choice("blocks.partition", b.partition, ("equiprobable", "uniform"))
        if c.inference_steps < 0:
            raise ConfigError(f"classify.inference_steps must be >= 0, got {c.inference_steps}")
        _choice("data.dataset", d.dataset, ("digits", "mnist", "cifar10", "cifar100"))
        _choice("data.split", d.split, ("train", "test"))
        _choice("train.schedule", t.schedule, ("sequential", "interleaved", "parallel"))
        _choice("sample.sampler", s.sampler, ("euler", "heun", "dpmpp_2m"))
        _choice("sample.grid", s.grid, ("quantile", "karras"))
        for name, value in [("model.image_size", m.image_size), ("model.in_channels", m.in_channels),
                            ("model.patch_size", m.patch_size), ("model.hidden_size", m.hidden_size),
                            ("model.depth", m.depth), ("model.num_heads", m.num_heads),
                            ("blocks.num_blocks", b.num_blocks), ("train.steps_per_block", t.steps_per_block),
                            ("train.batch_size", t.batch_size), ("train.log_every", t.log_every),
                            ("train.checkpoint_every", t.checkpoint_every), ("sample.steps", s.steps)]:
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if m.image_size % m.patch_size:
            raise ConfigError(f"model.image_size={m.image_size} is not a multiple of model.patch_size={m.patch_size}")
        if m.hidden_size % m.num_heads:
            raise ConfigError(f"model.hidden_size={m.hidden_size} is not a multiple of model.num_heads={m.num_heads}")
        if not 0 <= m.class_dropout < 1:
            raise ConfigError(f"model.class_dropout must be in [0, 1), got {m.class_dropout}")
        if not 0 < n.sigma_min < n.sigma_max:
            raise ConfigError(f"noise needs 0 < sigma_min < sigma_max, got {n.sigma_min} and {n.sigma_max}")
        if n.P_std <= 0 or n.sigma_data <= 0:
            raise ConfigError("noise.P_std and noise.sigma_data must be positive")
        if not 0 <= b.gamma < 1:
            raise ConfigError(f"blocks.gamma must be in [0, 1), got {b.gamma}")
        if b.num_blocks > m.depth:
            raise ConfigError(f"blocks.num_blocks={b.num_blocks} is larger than the number of layers model.depth={m.depth}")
        if b.layers_per_block is None:
            if m.depth % b.num_blocks:
                raise ConfigError(
                    f"model.depth={m.depth} layers do not split evenly into blocks.num_blocks={b.num_blocks}; "
                    f"give blocks.layers_per_block explicitly (e.g. {_uneven_example(m.depth, b.num_blocks)})")
        else:
            split = b.layers_per_block
            if len(split) != b.num_blocks:
                raise ConfigError(f"blocks.layers_per_block has {len(split)} entries but blocks.num_blocks={b.num_blocks}")
            if any(k < 1 for k in split):
                raise ConfigError(f"blocks.layers_per_block {list(split)} has a block with no layer")
            if sum(split) != m.depth:
                raise ConfigError(f"blocks.layers_per_block {list(split)} adds up to {sum(split)} layers "
                                  f"but model.depth={m.depth}")
        if d.crop_padding < 0 or d.holdout < 0:
            raise ConfigError("data.crop_padding and data.holdout must be non-negative")
        if d.dataset != "digits" and d.root is None:
            raise ConfigError(f"data.root is required for data.dataset={d.dataset!r}")
        if t.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {t.lr}")
        if s.guidance < 0:
            raise ConfigError(f"sample.guidance must be non-negative, got {s.guidance}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _uneven_example(L: int, B: int) -> list[int]:
    return [L // B + (1 if i < L % B else 0) for i in range(B)]


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
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in d.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Checks `value` (parsed JSON) against type hint `tp`; returns it converted (lists to tuples...)."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name + ".")
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name)
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
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {name}")


def load_config(path: str | Path) -> RunConfig:
    """Reads a JSON config file; missing fields take their defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {e}") from None
    return RunConfig.from_dict(d)


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Applies `section.field=value` overrides; values are parsed as JSON, else taken as strings."""
    d = cfg.to_dict()
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
    return RunConfig.from_dict(d)
