"""The optional dependencies (diffusers, transformers, datasets, mauve-text), imported the first time a run uses them.

Importing diffusers or transformers' Llama layers costs seconds (they pull in torch's compiler stack); a command
that trains our own DiT on the digits must not pay for them. Each is named once here and imported by `load`, which
stops with a ConfigError naming the extra to install when it is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import ConfigError

# The top-level package of each optional dependency -> the extra of pyproject.toml that installs it.
EXTRA_OF = {"diffusers": "diffusers", "transformers": "hf", "datasets": "hf", "mauve": "mauve"}


def load(module: str, needed_by: str) -> ModuleType:
    """`module` (e.g. "diffusers" or "transformers.models.llama.modeling_llama"), imported on first use.

    needed_by: what asked for it, as the user configured it (e.g. "data.vae"), for the message when it is missing.
    """
    extra = EXTRA_OF[module.split(".")[0]]  # one of the dependencies above, never a module of this package
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{needed_by} needs {module.split('.')[0]} ({e}): pip install -e '.[{extra}]' "
                          f"(or pip install 'diffusionblocks[{extra}]')") from None



def installed(module: str) -> bool:
    """Whether the optional dependency `module` is installed, found without importing it."""
    return importlib.util.find_spec(module) is not None
