"""The task registry: names to `Task`s, the built-in ones and any a user adds.

    from diffusionblocks.tasks import register, get_task
    register("mixture", MixtureTask)          # from Python; or, in a config file:
    {"task": "my_package.my_module:MixtureTask", ...}

The built-in tasks are imported on first use. This module is the only place that maps a task's
name to its code: a config dict names its task, and `config_from_dict`, `load_config` and
`apply_overrides` read it into that task's config class. Everything below the tasks (the trainer,
the router) is handed the `Task` object and never looks one up.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig, overridden, read_config_file, switched_task
from ..rundir import read_config_dict
from .base import ComparingTask, Coupling, EvaluatingTask, Evaluation, SamplingTask, Task

__all__ = ["BUILTIN_TASKS", "ComparingTask", "Coupling", "EvaluatingTask", "Evaluation", "SamplingTask", "Task",
           "apply_overrides", "available", "config_from_dict", "default_config", "get_task", "importable_by_name",
           "load_config", "read_config", "register"]

BUILTIN_TASKS = {  # name -> "module:class", imported when first asked for
    "generate": "diffusionblocks.tasks.image_generation:ImageGenerationTask",
    "classify": "diffusionblocks.tasks.classification:ClassificationTask",
    "mdlm": "diffusionblocks.tasks.masked_diffusion:MaskedDiffusionTask",
    "arlm": "diffusionblocks.tasks.autoregressive:AutoregressiveTask",
    "recurrent": "diffusionblocks.tasks.recurrent_depth:RecurrentDepthTask",
}
_REGISTRY: dict[str, Task] = {}


def register(name: str, task: type[Task] | Task) -> None:
    """Makes `task` (a Task subclass or instance) available as config "task": name."""
    instance = task() if isinstance(task, type) else task
    if not isinstance(instance, Task):
        raise TypeError(f"register({name!r}, ...) needs a diffusionblocks.tasks.Task, got {task!r}")
    if not issubclass(instance.config_class, RunConfig):
        raise TypeError(f"{type(instance).__name__}.config_class must subclass diffusionblocks.config.RunConfig")
    instance.name = name  # what its configs say in "task"
    _REGISTRY[name] = instance


def available() -> list[str]:
    """The names of the built-in and registered tasks."""
    return sorted({*BUILTIN_TASKS, *_REGISTRY})


def get_task(name: str) -> Task:
    """The task registered as `name`, or the class a "module:Class" path names (imported now)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    path = BUILTIN_TASKS.get(name, name)
    if ":" not in path:
        raise ConfigError(f"task={name!r} is not a known task ({', '.join(map(repr, available()))}) nor a "
                          "'package.module:TaskClass' path")
    module_name, _, attr = path.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:  # a module of the user's, beside where they run
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(f"task={name!r}: importing module {module_name!r} failed: {_error_line(e)}") from e
        raise ConfigError(f"task={name!r}: cannot import module {module_name!r} ({e}); is it installed, or in "
                          "the current directory?") from None
    except Exception as e:  # the module itself is broken: a syntax error, an error raised while it runs
        raise ConfigError(f"task={name!r}: importing module {module_name!r} failed: {_error_line(e)}") from e
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"task={name!r}: {module_name}.{attr} is not a diffusionblocks.tasks.Task subclass")
    register(name, cls)
    return _REGISTRY[name]


def _error_line(e: BaseException) -> str:
    """An exception in one line, with where it was raised: 'NameError: name 'x' is not defined (mod.py:3)'."""
    if isinstance(e, SyntaxError):
        where = f"{os.path.basename(e.filename or '?')}:{e.lineno}"
        return f"SyntaxError: {e.msg} ({where})"
    frames = traceback.extract_tb(e.__traceback__)
    where = f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {' '.join(str(e).split())}{where}"


def importable_by_name(name: str) -> bool:
    """Whether a fresh process can find task `name` from the name alone (built in, or "module:Class"), as
    `compare` needs; a name registered from Python is known only to the process that registered it."""
    return name in BUILTIN_TASKS or ":" in name


def default_config(name: str = "generate") -> RunConfig:
    """The default config of a task: `default_config()` is the main job, the digits DiT."""
    return get_task(name).default_config()


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """The config of the task that d names ("task", default "generate"), upgraded from older forms and checked."""
    if not isinstance(d, dict):
        raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
    task_name = d.get("task", "generate")
    if not isinstance(task_name, str):
        raise ConfigError(f"task must be a string, got {task_name!r}")
    task = get_task(task_name)
    return task.config_class.from_dict({**d, "task": task_name})


def read_config(run_dir) -> RunConfig:
    """The config of a run directory (its config.json, in its task's config class), with a clear error when the
    directory is not a run."""
    d = read_config_dict(run_dir)
    try:
        return config_from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{str(Path(run_dir) / 'config.json')!r}: {e}") from e.__cause__


def load_config(path) -> RunConfig:
    """Reads a JSON config file into its task's config; missing fields take their defaults."""
    return config_from_dict(read_config_file(path))


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """cfg with `section.field=value` overrides; values are parsed as JSON, else taken as strings.

    `task=NAME` (applied first) starts from that task's default config and keeps, of the config
    given, the fields it changed from its own task's defaults where the new task has them (a
    dataset, a seed, a name); the other overrides then apply to it.
    """
    d = cfg.to_dict()
    for item in overrides:
        key, sep, name = item.partition("=")
        if key == "task" and sep:  # the same task keeps cfg as it is (every field it set is carried over)
            d = switched_task(cfg.to_dict(), default_config(cfg.task).to_dict(), default_config(name).to_dict())
    return config_from_dict(overridden(d, overrides))
