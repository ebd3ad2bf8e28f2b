"""Block checkpoints: each block's inference weights and training state, and where copied blocks came from.

    RUN/block_00.safetensors       block 0's inference weights (EMA weights when EMA is on); metadata: step, config
    RUN/block_00.state.pt          block 0's training state for resuming: weights, EMA, AdamW state, step, time
    RUN/composition.json           for blocks copied from other runs (compose, the blocks --from keeps): each one's
                                   source run, step, the steps its source asked of it, and sha256

Blocks share no parameter, so each block's files can be written by a different process or machine
(rundir.py writes them safely: temporaries, locks). A block's checkpoint commits its weights first and
its training state last: the state names the last whole checkpoint, and the weights are never older
than it.

A copied block is judged by its source, not by this run's config: it is complete when it reached the
steps its source asked of it, its file must still be the bytes whose sha256 was recorded, and no
command of this run trains it (fine-tuning one is a new run, `train --from`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .changes import first_difference, identity
from .config import ConfigError, RunConfig
from .rundir import atomic_replace, block_state_path, block_weights_path, fsync_dir, fsync_file, temporary_path, writing

FORMAT = "diffusionblocks/1"


def _write_weights(tmp: Path, b: int, state_dict: dict[str, torch.Tensor], step: int, cfg: RunConfig,
                   train_time_s: float) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    metadata = {"format": FORMAT, "block": str(b), "step": str(step), "train_time_s": repr(float(train_time_s)),
                "config": json.dumps(cfg.to_dict())}
    save_file(tensors, str(tmp), metadata=metadata)
    fsync_file(tmp)


def save_block(run_dir: Path, b: int, state_dict: dict[str, torch.Tensor], step: int, cfg: RunConfig,
               train_time_s: float = 0.0) -> None:
    """Writes block b's inference weights with its step, training time and the run's config as metadata."""
    path = block_weights_path(run_dir, b)
    tmp = temporary_path(path)
    with writing(path, tmp):
        _write_weights(tmp, b, state_dict, step, cfg, train_time_s)
        os.replace(tmp, path)


def commit_block(run_dir: Path, b: int, weights: dict[str, torch.Tensor], state: dict[str, Any], cfg: RunConfig) -> None:
    """Checkpoints block b as one unit: its inference weights and its training state (which holds `step`).

    Both are written to temporaries and flushed; the weights are renamed into place first and the state
    last. A process killed at any instant leaves the old checkpoint, or the new one, or the new weights
    with the old state: never a state whose weights are older than it. The last case resumes from the
    old state and redoes the same steps, which rewrites the same weights.
    """
    w_path, s_path = block_weights_path(run_dir, b), block_state_path(run_dir, b)
    w_tmp, s_tmp = temporary_path(w_path), temporary_path(s_path)
    with writing(w_path, w_tmp, s_tmp):
        _write_weights(w_tmp, b, weights, state["step"], cfg, state.get("train_time_s", 0.0))
    with writing(s_path, w_tmp, s_tmp):
        torch.save(state, s_tmp)
        fsync_file(s_tmp)
    with writing(w_path, w_tmp, s_tmp):
        os.replace(w_tmp, w_path)
    with writing(s_path, s_tmp):
        os.replace(s_tmp, s_path)
    fsync_dir(Path(run_dir))


def _weights_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"checkpoint {str(path)!r} is corrupt or not a safetensors file: {e}") from None


def block_info(run_dir: Path, b: int) -> dict[str, Any] | None:
    """Block b's weights-file metadata (step, train_time_s), read without loading weights; None when missing."""
    path = block_weights_path(run_dir, b)
    if not path.is_file():
        return None
    meta = _weights_metadata(path)
    try:
        return {"block": b, "step": int(meta.get("step", "0")), "train_time_s": float(meta.get("train_time_s", "0"))}
    except ValueError as e:
        raise ConfigError(f"checkpoint {str(path)!r} is corrupt: {e}") from None


def check_block_metadata(path: Path, b: int, cfg: RunConfig) -> None:
    """Refuses a weights file written for another block, or under another model, noise axis or partition."""
    meta = _weights_metadata(path)
    if "block" in meta and meta["block"] != str(b):
        raise ConfigError(f"checkpoint {str(path)!r} holds block {meta['block']}'s weights, not block {b}'s "
                          "(a file copied to the wrong name?)")
    if "config" not in meta:
        return
    try:
        d = json.loads(meta["config"])
    except json.JSONDecodeError as e:
        raise ConfigError(f"checkpoint {str(path)!r} carries an unreadable config: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"checkpoint {str(path)!r} carries an unreadable config: not a JSON object")
    task = d.get("task", cfg.task)  # (the oldest files do not name it)
    if task != cfg.task:
        raise ConfigError(f"checkpoint {str(path)!r} was trained for task {task!r}, not this run's {cfg.task!r}: "
                          "it is not this run's block")
    try:
        theirs = identity(type(cfg).from_dict({**d, "task": cfg.task}))
    except ConfigError as e:
        raise ConfigError(f"checkpoint {str(path)!r} carries an unreadable config: {e}") from None
    ours = identity(cfg)
    if theirs != ours:
        field = first_difference(theirs, ours, "")
        raise ConfigError(f"checkpoint {str(path)!r} was trained with another {field} than this run's "
                          "config.json: it is not this run's block")


def block_step(run_dir: Path, b: int) -> int | None:
    """The training step recorded in block b's weights file, or None when the file is missing."""
    info = block_info(run_dir, b)
    return None if info is None else info["step"]


def check_state_dict(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """Raises ConfigError naming the first missing, unexpected or mis-shaped tensor."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing:
        raise ConfigError(f"{what} does not match the config: tensor {missing[0]!r} is missing "
                          f"({len(missing)} missing in all)")
    if unexpected:
        raise ConfigError(f"{what} does not match the config: unexpected tensor {unexpected[0]!r}")
    for k, v in expected.items():
        if tuple(loaded[k].shape) != tuple(v.shape):
            raise ConfigError(f"{what} does not match the config: {k!r} has shape {tuple(loaded[k].shape)}, "
                              f"the config needs {tuple(v.shape)}")


def load_block_weights(run_dir: Path, b: int, module: torch.nn.Module, cfg: RunConfig | None = None,
                       verify: bool = True) -> int:
    """Loads block b's inference weights into `module`; returns the step they were saved at.

    cfg: the run's config, to check the file's metadata against (see check_block_metadata).
    verify: check a copied block's file against the sha256 recorded when it was copied (copied_block); a caller
    that loads a block again (streaming) checks it the first time only. A block trained in its run has no record,
    and costs nothing more.
    """
    path = block_weights_path(run_dir, b)
    if not path.is_file():
        raise ConfigError(f"block {b} has no weights: {str(path)!r} is missing (train it first)")
    if cfg is not None:
        check_block_metadata(path, b, cfg)
    if verify:
        copied_block(run_dir, b)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"checkpoint {str(path)!r} is corrupt or not a safetensors file: {e}") from None
    check_state_dict(tensors, module.state_dict(), f"checkpoint {str(path)!r}")
    module.load_state_dict(tensors)
    return block_step(run_dir, b) or 0


def save_tensor_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Writes a small safetensors file atomically."""
    tmp = temporary_path(path)
    with writing(path, tmp):
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
        atomic_replace(tmp, path)


def load_tensor_file(path: Path, key: str) -> torch.Tensor:
    try:
        return load_file(str(path))[key]
    except (SafetensorError, OSError, KeyError) as e:
        raise ConfigError(f"{str(path)!r} is corrupt or lacks {key!r}: {e}") from None


def load_block_tensor(run_dir: Path, b: int, key: str) -> torch.Tensor:
    """One tensor of block b's weights file."""
    return load_tensor_file(block_weights_path(run_dir, b), key)


def load_train_state(run_dir: Path, b: int, map_location: str | torch.device = "cpu",
                     mmap: bool = False) -> dict[str, Any] | None:
    """Block b's training state, or None when it has none yet. mmap: read tensors only when used."""
    path = block_state_path(run_dir, b)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several types for a damaged archive
        raise ConfigError(f"training state {str(path)!r} is corrupt: {e}") from None


# ---- where copied blocks came from (composition.json)

COMPOSITION_FILE = "composition.json"
# How a recorded block came into its run: "composed" (compose), "kept" (a block `train --from` left as it was) and
# "converted" (made by `convert` from an end-to-end run's layers) are copies, this run's file being the recorded
# bytes; "start" is the block `train --from` fine-tunes, the recorded file (the source's) being where its training
# starts.
COPY_ROLES = ("composed", "kept", "converted")


def read_composition(run_dir: Path) -> list[dict[str, Any]] | None:
    """The records of a run's blocks that came from other runs, or None for a run that has none."""
    path = Path(run_dir) / COMPOSITION_FILE
    if not path.is_file():
        return None
    try:
        rows = json.loads(path.read_text())["blocks"]
        for row in rows:
            int(row["block"]), str(row["sha256"]), int(row["step"]), int(row["steps_per_block"])
        return rows
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{str(path)!r} is unreadable: {type(e).__name__}: {e}") from None


def save_composition(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    path = Path(run_dir) / COMPOSITION_FILE
    tmp = temporary_path(path)
    with writing(path, tmp):
        tmp.write_text(json.dumps({"blocks": sorted(rows, key=lambda r: r["block"])}, indent=2) + "\n")
        atomic_replace(tmp, path)


def block_source(run_dir: Path, b: int) -> dict[str, Any] | None:
    """What composition.json records of block b (see COPY_ROLES), or None when block b was made in this run."""
    return next((row for row in read_composition(run_dir) or [] if int(row["block"]) == b), None)


def is_copy(row: dict[str, Any] | None) -> bool:
    return row is not None and row.get("role", "composed") in COPY_ROLES


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_recorded_sha256(path: Path, row: dict[str, Any], what: str) -> None:
    """Refuses a file that is no longer the bytes `row` recorded: a bit flipped on disk, or a file replaced."""
    if sha256_file(path) != row["sha256"]:
        raise ConfigError(f"checkpoint {str(path)!r} is damaged or was replaced: its sha256 is not the one recorded "
                          f"when {what}; copy the block again from {row['run']!r}")


def copied_block(run_dir: Path, b: int) -> dict[str, Any] | None:
    """Block b's record when it is a copy of another run's block, after checking that its file is still the recorded
    bytes; None when block b was made in this run (or, a copy, has lost its file)."""
    row = block_source(run_dir, b)
    path = block_weights_path(run_dir, b)
    if not is_copy(row) or not path.is_file():
        return None
    check_recorded_sha256(path, row, f"block {b} was copied from {row['run']!r}")
    return row


def state_step(run_dir: Path, b: int) -> int | None:
    """The step of block b's training state (where --resume continues), without reading its tensors."""
    state = load_train_state(run_dir, b, mmap=True)
    return None if state is None else int(state["step"])


def progress(run_dir: Path, b: int, cfg: RunConfig) -> dict[str, Any] | None:
    """Where block b stands, as --resume sees it: `step`, `target` (the steps asked of it), `weights_step`,
    `train_time_s`, `has_state`, `source` (its composition.json record, if any) and `copy` (whether it is a copy
    of another run's block, its sha256 checked).

    A block trained here is asked for the run's train.steps_per_block; a copy, for what its source asked of it.
    None when the block has neither file (or, a copy, has lost its weights).
    """
    info, saved = block_info(run_dir, b), state_step(run_dir, b)
    if info is None and (saved is None or is_copy(block_source(run_dir, b))):  # (a copy is its weights file)
        return None
    copy = copied_block(run_dir, b)
    total = cfg.train.steps_per_block
    if copy is not None:  # what its source trained; this run has no training of it to continue
        step, target = info["step"], int(copy["steps_per_block"])
    else:
        step, target = saved, total
        if step is None:  # final weights are the block's result; partial ones cannot be continued without a state
            step = info["step"] if info["step"] >= total else 0
    return {"block": b, "step": step, "target": target, "has_state": saved is not None,
            "weights_step": None if info is None else info["step"],
            "train_time_s": 0.0 if info is None else info["train_time_s"],
            "source": block_source(run_dir, b), "copy": copy is not None}


def repair_block(run_dir: Path, b: int, cfg: RunConfig) -> bool:
    """Rewrites block b's weights from its training state when they are missing or older than it; True if it did.

    The commit order never leaves such weights, but a file deleted or restored by hand can.
    """
    step = state_step(run_dir, b)
    info = block_info(run_dir, b) if block_weights_path(run_dir, b).is_file() else None
    if step is None or (info is not None and info["step"] >= step):
        return False
    state = load_train_state(run_dir, b)
    weights = state["ema"] if state.get("ema") is not None else state["model"]
    save_block(run_dir, b, weights, step, cfg, float(state.get("train_time_s", 0.0)))
    return True
