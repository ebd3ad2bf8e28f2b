"""The task registry: names to `Task`s, the built-in ones and any a user adds.

    from diffusionblocks.tasks import register, get_task
    register("mixture", MixtureTask)          # from Python; or, in a config file:
    {"task": "my_package.my_module:MixtureTask", ...}

The built-in tasks are imported on first use. This module is the only place that maps a task's
name to its code; nothing else in the package asks which task it runs.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

from ..config import ConfigError, RunConfig
from .base import ComparingTask, Coupling, EvaluatingTask, Evaluation, SamplingTask, Task

__all__ = ["BUILTIN_TASKS", "ComparingTask", "Coupling", "EvaluatingTask", "Evaluation", "SamplingTask", "Task",
           "available", "default_config", "get_task", "importable_by_name", "register"]

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
