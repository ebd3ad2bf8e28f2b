"""The options of `sample` and `evaluate`, typed: frozen dataclasses whose fields are the options.

Every task's options extend SampleOptions or EvaluateOptions with its own fields, each made by `option`
with its default and help. The command line is made from the fields (cli.py): a field is the flag of its
name (`top_p` is `--top-p`; a trailing underscore is dropped, `class_` is `--class`), typed by its
annotation; a bool field that is False by default is the switch `--name`, one that is True by default
the switch `--no-name` (its help says what that switch does). From Python, the same options are keyword
arguments:

    runs.sample_run(run, out="sevens.npz", num=500, class_=7, sampler="heun", steps=30)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from .config import PRECISIONS, ConfigError


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, required: bool = False,
           metavar: str | None = None) -> Any:
    """A field of an options dataclass: its default, its help line, and (for strings) the values it may take."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "required": required,
                                                         "metavar": metavar})


@dataclass(frozen=True)
class SampleOptions:
    """What `sample` takes whatever the task: a task's sample options extend these."""

    num: int = option(100, "number of samples")
    seed: int = option(0, "sample i uses the noise of seed (seed, i)")
    device: str | None = option(None, "cpu, cuda... (default: cuda if available)")
    out: str | None = option(None, "output file, of a kind its task writes (image generation: a .png grid, or .npz "
                             "with images (N,C,H,W in [-1,1]) and labels; the language tasks: .txt)", required=True)
    overwrite: bool = option(False, "replace --out if it exists")
    precision: str = option("auto", "arithmetic of the network: auto is bf16 autocast on CUDA, fp32 elsewhere; tf32 "
                            "is CUDA's TF32 matmuls", choices=PRECISIONS)
    stream: bool = option(False, "keep one block in memory at a time (models larger than the device): each block is "
                          "loaded from disk when the sampler reaches its noise levels")
    progress: bool = option(True, "no progress bars")


@dataclass(frozen=True)
class EvaluateOptions:
    """What `evaluate` (and each run of `compare`) takes whatever the task: a task's evaluate options extend these."""

    num: int = option(1000, "number of samples the metrics use (where the task samples)")
    seed: int = option(0, "seed of the samples and the evaluation's random subsets")
    out: str | None = option(None, "output directory (default: RUN/eval-<settings>)")
    overwrite: bool = option(False, "replace an existing output directory")
    cache_dir: str | None = option(None, "reference classifier cache (default: $DIFFUSIONBLOCKS_CACHE or "
                                   "~/.cache/diffusionblocks)")
    precision: str = option("auto", "arithmetic of the networks (the run's and the reference classifier): auto is "
                            "bf16 autocast on CUDA, fp32 elsewhere", choices=PRECISIONS)
    device: str | None = option(None, "cpu, cuda... (default: cuda if available)")
    progress: bool = option(True, "no progress bars")


def flag(f: dataclasses.Field) -> str:
    """The command-line flag of an option: `top_p` -> --top-p, `class_` -> --class, `cache` (True) -> --no-cache."""
    name = f.name.rstrip("_").replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def option_type(cls: type, name: str) -> type:
    """The scalar type of an option (int, float, str or bool), its `| None` removed."""
    tp = typing.get_type_hints(cls)[name]
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp not in (int, float, str, bool):
        raise TypeError(f"option {cls.__name__}.{name} has type {tp}; options are int, float, str or bool")
    return tp


def own_fields(cls: type, base: type) -> list[dataclasses.Field]:
    """The options `cls` adds to `base`: the task's own, in the order they are declared."""
    inherited = {f.name for f in dataclasses.fields(base)}
    return [f for f in dataclasses.fields(cls) if f.name not in inherited]


def check_value(cls: type, f: dataclasses.Field, value: Any) -> Any:
    """`value` of option f, checked against its type and choices (ConfigError naming its flag); ints become floats
    where a float is asked for. The task checks the rest (a range, say), as it does for the command line."""
    name, tp = flag(f), option_type(cls, f.name)
    if value is None:
        if f.default is not None or f.metadata.get("required"):
            raise ConfigError(f"{name} must be given")
        return None
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{name} must be {_KIND[tp]}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{name} {value!r} is not one of {', '.join(map(repr, choices))}")
    return value


_KIND = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def make_options(cls: type, values: dict[str, Any], what: str) -> Any:
    """An instance of options class `cls` from keyword values, each checked (ConfigError naming the first wrong one);
    what: whose options they are, for the message on an unknown name ("sample options of task 'generate'")."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{unknown[0]!r} is not one of the {what} (they are: {', '.join(fields)})")
    return cls(**{k: check_value(cls, fields[k], v) for k, v in values.items()})


def replace_options(options: Any, values: dict[str, Any], what: str) -> Any:
    """`options` with some fields changed, each checked as `make_options` checks them."""
    return make_options(type(options), {**{f.name: getattr(options, f.name) for f in dataclasses.fields(options)},
                                        **values}, what)
