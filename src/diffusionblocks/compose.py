"""Composing a run from the blocks of other runs (method.md section 4: blocks share no parameter).

Block b of a run denoises the noise levels of the b-th range of the partition, and nothing else ties it
to the run that trained it. So blocks trained apart (on other data, by other jobs, fine-tuned or not) can
be chained as one model, provided they agree on what chaining needs: the task, the noise axis and its
partition, and the model's shape (for images: size, channels and classes; one model config per run).

    RUN/config.json          the config of the source of block 0 (what may differ between blocks, e.g.
                             the dataset, can be overridden), validated like any run's
    RUN/block_NN.safetensors byte-for-byte copies of the sources' weights
    RUN/composition.json     where each block came from: run, its config name and data, step, sha256
    RUN/metrics.jsonl        each block's rows of its source's metrics
    RUN/vocab.json           a copy of the sources' vocabulary (text tasks), which they must share
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from . import checkpoint
from .config import ConfigError, RunConfig, apply_overrides
from .text import VOCAB_FILE, vocabulary_difference

logger = logging.getLogger(__name__)

COMPOSITION_FILE = "composition.json"
# What a composed run may set for itself: its name, and how it is evaluated and sampled.
OVERRIDABLE = ("name", "data.", "sample.")
# The sections chained blocks must agree on, and what each one means for chaining.
_MEANING = {"task": "task", "noise": "noise axis", "blocks": "partition of the noise axis and of the layers",
            "model": "model (its shape, channels and classes)"}


def parse_block_sources(specs: list[str]) -> dict[int, Path]:
    """['0=RUN_A', '1,2=RUN_B'] -> {0: RUN_A, 1: RUN_B, 2: RUN_B}."""
    sources: dict[int, Path] = {}
    for spec in specs:
        indices, sep, run = spec.partition("=")
        try:
            blocks = [int(i) for i in indices.split(",")] if sep and run else None
        except ValueError:
            blocks = None
        if blocks is None:
            raise ConfigError(f"--block {spec!r} is not of the form INDEX=RUN or INDEX,INDEX=RUN")
        for b in blocks:
            if b < 0:
                raise ConfigError(f"--block {spec!r}: block indices start at 0")
            if b in sources:
                raise ConfigError(f"--block {spec!r}: block {b} is already taken from {str(sources[b])!r}")
            sources[b] = Path(run)
    if not sources:
        raise ConfigError("compose needs at least one --block INDEX=RUN")
    return sources


def _chain_difference(ref: RunConfig, cfg: RunConfig) -> str | None:
    """What keeps blocks of `cfg` from chaining with blocks of `ref`: the first differing field, or None."""
    ours, theirs = checkpoint.identity(ref.to_dict()), checkpoint.identity(cfg.to_dict())
    for section in sorted(set(ours) | set(theirs), key=lambda s: list(_MEANING).index(s) if s in _MEANING else 99):
        if ours.get(section) != theirs.get(section):
            field = checkpoint.first_difference(theirs.get(section), ours.get(section), section)
            return f"another {_MEANING.get(section, section)}: {field}"
    return None


def check_sources(sources: dict[int, Path]) -> tuple[RunConfig, dict[int, RunConfig]]:
    """The config of block 0's source and each source's config, after refusing any block that cannot chain."""
    configs = {b: checkpoint.read_config(run) for b, run in sources.items()}
    if 0 not in sources:
        raise ConfigError("every block needs a source, block 0 too: add --block 0=RUN")
    ref = configs[0]
    B = ref.blocks.num_blocks
    for b, run in sorted(sources.items()):
        cfg = configs[b]
        if b >= cfg.blocks.num_blocks:
            raise ConfigError(f"--block {b}={run}: that run has blocks 0..{cfg.blocks.num_blocks - 1}, no block {b}")
        reason = _chain_difference(ref, cfg)
        if reason is not None:
            raise ConfigError(f"block {b} of {str(run)!r} cannot chain with block 0 of {str(sources[0])!r}: "
                              f"{reason}")
        path = checkpoint.block_weights_path(run, b)
        if not path.is_file():
            raise ConfigError(f"block {b} of {str(run)!r} has no weights (it is not trained yet)")
        checkpoint.check_block_metadata(path, b, cfg)  # a corrupt or misnamed file is refused here
    missing = [b for b in range(B) if b not in sources]
    if missing:
        raise ConfigError(f"the model has {B} blocks; block(s) {missing} have no source: add "
                          f"{' '.join(f'--block {b}=RUN' for b in missing)}")
    return ref, configs


def check_vocabularies(sources: dict[int, Path]) -> None:
    """Refuses blocks whose runs read tokens through different vocabularies, naming the first id that differs."""
    if not any((run / VOCAB_FILE).is_file() for run in sources.values()):
        return  # a task without one (images)
    first = sources[0]
    for b, run in sorted(sources.items()):
        difference = vocabulary_difference(first / VOCAB_FILE, run / VOCAB_FILE)
        if difference is not None:
            raise ConfigError(f"block {b} of {str(run)!r} cannot chain with block 0 of {str(first)!r}: another "
                              f"vocabulary: {difference}")


def copy_vocabulary(sources: dict[int, Path], out: Path) -> None:
    """The sources' vocabulary (they share one: `check_vocabularies`), byte for byte into the composed run `out`."""
    if (sources[0] / VOCAB_FILE).is_file():
        _copy(sources[0] / VOCAB_FILE, out / VOCAB_FILE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _copy(src: Path, dst: Path) -> None:
    """src to dst byte for byte, through a temporary of this process: dst is whole or absent."""
    tmp = checkpoint.temporary_path(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_metrics(sources: dict[int, Path], out: Path) -> None:
    """Each block's rows of its source's metrics.jsonl, so that the composed run's loss curves are its blocks'."""
    lines = []
    for b, run in sorted(sources.items()):
        path = run / "metrics.jsonl"
        if path.is_file():
            lines += [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("block") == b]
    if lines:
        (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def compose_run(sources: dict[int, Path], out: Path, overrides: list[str] = ()) -> RunConfig:
    """Writes a run directory `out` (new or empty) whose block b is a copy of block b of sources[b]."""
    ref, configs = check_sources(sources)
    check_vocabularies(sources)
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith(OVERRIDABLE)]
    if bad:
        raise ConfigError(f"override {bad[0]!r}: a composed run may only set {', '.join(OVERRIDABLE)}; the rest "
                          "is what its blocks were trained as")
    cfg = apply_overrides(ref, [f"name={ref.name}-composed", *overrides])
    from .tasks import get_task

    get_task(cfg.task).load_run_data(cfg, sources[0])  # the data it will be evaluated on, as its blocks read it
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r} already exists and is not an empty directory; choose another")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        rows: list[dict[str, Any]] = []
        for b, run in sorted(sources.items()):
            src = checkpoint.block_weights_path(run, b)
            dst = checkpoint.block_weights_path(out, b)
            _copy(src, dst)
            info = checkpoint.block_info(out, b)
            digest = _sha256(dst)
            if digest != _sha256(src):
                raise ConfigError(f"block {b} of {str(run)!r} changed while it was copied; compose again")
            src_cfg = configs[b]
            rows.append({"block": b, "run": str(run.resolve()), "run_name": src_cfg.name,
                         "data": src_cfg.to_dict().get("data"), "step": info["step"],
                         "steps_per_block": src_cfg.train.steps_per_block, "sha256": digest})
            if info["step"] < src_cfg.train.steps_per_block:
                logger.warning("block %d of %s is partly trained (step %d of %d)", b, run, info["step"],
                               src_cfg.train.steps_per_block)
        _copy_metrics(sources, out)
        copy_vocabulary(sources, out)
        checkpoint.save_config(out, cfg)
        (out / COMPOSITION_FILE).write_text(json.dumps({"blocks": rows}, indent=2) + "\n")
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                child.unlink()
        raise
    return cfg


def read_composition(run_dir: Path) -> list[dict[str, Any]] | None:
    """The blocks' sources of a composed run, or None for a run trained as one."""
    path = Path(run_dir) / COMPOSITION_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["blocks"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{str(path)!r} is unreadable: {e}") from None
