"""Which fields of a run's config may change once the run exists, and by which operation: one table.

A run's config says what its blocks are (the task, the model, the noise axis and its partition) and how
they are trained, sampled and evaluated. What they are never changes; the rest may, where MAY_CHANGE says:

    resume   `train --resume RUN`: how long and how the run trains and samples, not what it is
    from     `train --from RUN`: a new run from a trained one, which may train differently (learning rate,
             seed...) and on other data (adapting a model to a new domain), not be another model
    compose  `compose`: a run whose blocks come from other runs; its name, and what it is evaluated on
             and how it samples (the rest is what its blocks were trained as)

Whatever any operation may change is not part of a block's identity: blocks whose configs differ only
there are blocks of one model and chain (`identity`, checked against each weights file's metadata).
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError, RunConfig, overridden

RESUME, FROM, COMPOSE = "resume", "from", "compose"

# A field ("section.field", or a top-level "name") or a whole section ("section.") -> the operations that may
# change it. The order is the order in which messages list them.
MAY_CHANGE: dict[str, tuple[str, ...]] = {
    "name": (FROM, COMPOSE),
    "train.steps_per_block": (RESUME, FROM),
    "train.log_every": (RESUME, FROM),
    "train.checkpoint_every": (RESUME, FROM),
    "train.blocks_to_train": (RESUME, FROM),
    "train.": (FROM,),
    "data.": (FROM, COMPOSE),
    "sample.": (RESUME, FROM, COMPOSE),
}
# The operations that may change the fields a task's config class lists in its `resumable_fields` (how its runs
# are used).
TASK_FIELDS_MAY_CHANGE: tuple[str, ...] = (RESUME,)


def changeable(operation: str, cfg: RunConfig) -> tuple[str, ...]:
    """The fields and sections `operation` may change in a run of config cfg (its task's config class), a field
    left out when its whole section is listed: ('name', 'train.', 'data.', 'sample.') for `from`."""
    if operation not in (RESUME, FROM, COMPOSE):
        raise ValueError(f"unknown operation {operation!r}")
    keys = [k for k, ops in MAY_CHANGE.items() if operation in ops]
    if operation in TASK_FIELDS_MAY_CHANGE:
        keys += type(cfg).resumable_fields
    sections = [k for k in keys if k.endswith(".")]
    return tuple(k for k in keys if k.endswith(".") or not k.startswith(tuple(sections)))


def may_change(key: str, operation: str, cfg: RunConfig) -> bool:
    """Whether `operation` may change the config field `key` ("train.lr") of a run of config cfg."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in changeable(operation, cfg))


def refused_overrides(cfg: RunConfig, overrides: list[str], operation: str, restated_ok: bool = True) -> list[str]:
    """The `section.field=value` overrides of cfg that `operation` may not make; restated_ok: an override that
    restates cfg's own value (--schedule parallel on a parallel run) changes nothing and is not refused."""
    return [o for o in overrides if not may_change(o.split("=", 1)[0], operation, cfg)
            and not (restated_ok and _restates(cfg, o))]


def _restates(cfg: RunConfig, override: str) -> bool:
    """Whether the override sets a field of cfg to the value it has."""
    try:
        return type(cfg).from_dict(overridden(cfg.to_dict(), [override])) == cfg
    except ConfigError:
        return False


def identity(cfg: RunConfig) -> dict[str, Any]:
    """cfg as a dict without whatever any operation may change: what blocks that chain must agree on."""
    d = cfg.to_dict()
    variable = [*MAY_CHANGE, *type(cfg).resumable_fields]
    out = {k: v for k, v in d.items() if k not in variable and f"{k}." not in variable}
    for name in variable:
        section, _, field = name.partition(".")
        if field and isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k != field}
    return out


def first_difference(a: Any, b: Any, name: str) -> str:
    """The first field where two config dicts differ, with both values: 'model.depth (6, not 4)'."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{name}.{k}".lstrip("."))
    return f"{name} ({a!r}, not {b!r})"
