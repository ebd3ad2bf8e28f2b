"""Run directories and checkpoints: config.json plus one safetensors file per block.

    RUN/config.json                the full RunConfig
    RUN/block_00.safetensors       block 0's inference weights (EMA weights when EMA is on); metadata: step, config
    RUN/block_00.state.pt          block 0's training state for resuming: weights, EMA, AdamW state, step, time
    RUN/metrics.jsonl              one JSON line per logging interval and block
    RUN/block_00.lock              exists while a job trains block 0 (it holds a lock on it)
    RUN/composition.json           for blocks copied from other runs (compose, the blocks --from keeps): each one's
                                   source run, step, the steps its source asked of it, and sha256

Blocks share no parameter, so each block's files can be written by a different process or machine.
Every file is written under a temporary name of its own process, flushed to disk and renamed, so a
killed process never leaves half a file. A block's checkpoint commits its weights first and its
training state last: the state names the last whole checkpoint, and the weights are never older
than it. A job that trains a block holds an exclusive lock on the block's lock file, which the
operating system releases when the job ends, however it ends.

A copied block is judged by its source, not by this run's config: it is complete when it reached the
steps its source asked of it, its file must still be the bytes whose sha256 was recorded, and no
command of this run trains it (fine-tuning one is a new run, `train --from`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ConfigError, RunConfig

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, blocks are not claimed
    fcntl = None

FORMAT = "diffusionblocks/1"


def block_weights_path(run_dir: Path, b: int) -> Path:
    return Path(run_dir) / f"block_{b:02d}.safetensors"


def block_state_path(run_dir: Path, b: int) -> Path:
    return Path(run_dir) / f"block_{b:02d}.state.pt"


def block_lock_path(run_dir: Path, b: int) -> Path:
    return Path(run_dir) / f"block_{b:02d}.lock"


def temporary_path(path: Path) -> Path:
    """A temporary name for `path` that no other process uses, in the same directory (so renaming is atomic)."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def remove_temporaries(run_dir: Path, name: str) -> None:
    """Deletes the temporaries of `name` that killed processes left behind (call it holding the file's lock)."""
    for tmp in Path(run_dir).glob(f".{name}.*.tmp"):
        tmp.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has this pid (a killed one's pid may be reused: then it counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def dead_temporary(path: Path) -> bool:
    """Whether `path` is a temporary of temporary_path's form whose process, on this host, has ended."""
    m = re.fullmatch(r"\..+\.(\d+)\.tmp", path.name)
    return bool(m) and path.name.endswith(f".{socket.gethostname()}.{m[1]}.tmp") and not pid_alive(int(m[1]))


def remove_dead_temporaries(run_dir: Path, name: str) -> None:
    """Deletes the temporaries of `name` whose processes have ended (no lock needed: a live writer's are kept)."""
    for tmp in Path(run_dir).glob(f".{name}.*.tmp"):
        if dead_temporary(tmp):
            tmp.unlink(missing_ok=True)


def leftovers_only(run_dir: Path) -> bool:
    """Whether a directory holds nothing but what killed commands leave: block locks no job holds and temporaries
    of ended processes (a command killed before it wrote config.json). Such a directory is as good as empty."""
    entries = list(Path(run_dir).iterdir())
    for entry in entries:
        lock = re.fullmatch(r"block_(\d+)\.lock", entry.name)
        if lock and entry.is_file() and lock_holder(run_dir, int(lock[1])) is None:
            continue
        if entry.is_file() and dead_temporary(entry):
            continue
        return False
    return bool(entries)


def clear_leftovers(run_dir: Path) -> None:
    """Deletes the temporaries of ended processes from a directory of leftovers_only (the lock files are reused)."""
    for entry in Path(run_dir).iterdir():
        if entry.is_file() and dead_temporary(entry):
            entry.unlink(missing_ok=True)


def _fsync(tmp: Path) -> None:
    """Flushes a written file to disk, with the permissions a plain new file would get."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Makes the renames in `directory` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_replace(tmp: Path, path: Path) -> None:
    """Moves a fully written temporary file into place."""
    _fsync(tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def _writing(path: Path, *tmps: Path):
    """Removes the temporaries when writing fails and says, in one line, which file could not be written."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointWriteError(f"could not write {str(path)!r}: {reason}", reason) from None


class CheckpointWriteError(ConfigError):
    """A file of a run could not be written (disk full, no permission...); what was there before is intact."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message  # what the file system said ("No space left on device")


def new_run_dir(root: str | Path, name: str) -> Path:
    """A new directory root/NNNNN-name, numbered after the highest existing run (EDM's convention)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ids = [int(m.group(1)) for p in root.iterdir() if (m := re.match(r"^(\d{5})-", p.name))]
    while True:
        path = root / f"{max(ids, default=-1) + 1:05d}-{name}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another process took the number
            ids.append(max(ids, default=-1) + 1)


def save_text(path: Path, text: str) -> None:
    """Writes a small UTF-8 file of a run through a temporary: it is whole or as it was. A temporary of this file
    that a killed writer left is removed first (nothing else would)."""
    remove_dead_temporaries(path.parent, path.name)
    tmp = temporary_path(path)
    with _writing(path, tmp):
        tmp.write_text(text, encoding="utf-8")
        _atomic_replace(tmp, path)


def save_config(run_dir: Path, cfg: RunConfig) -> None:
    save_text(Path(run_dir) / "config.json", cfg.to_json() + "\n")


def join_run(run_dir: Path, cfg: RunConfig) -> None:
    """Writes config.json unless another job already did; then it must be the same config.

    Several independent jobs (one per block) may call this at once on one directory: the config is
    published with a hard link, which fails atomically when the file exists.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    remove_dead_temporaries(run_dir, path.name)
    tmp = temporary_path(path)
    with _writing(path, tmp):
        tmp.write_text(cfg.to_json() + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        existing = read_config(run_dir)
        if existing != cfg:
            raise ConfigError(f"{str(path)!r} holds a different config than this job's; a job joining a run "
                              "must use the run's config") from None
    finally:
        tmp.unlink()


def read_config(run_dir: str | Path) -> RunConfig:
    """The RunConfig of a run directory, with a clear error when it is not one."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{str(run_dir)!r} is a file, not a run directory")
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} does not exist")
    path = run_dir / "config.json"
    if not path.is_file():
        if leftovers_only(run_dir):
            raise ConfigError(f"{str(run_dir)!r} holds no run, only what a killed command left (no config.json): "
                              f"start the run with `diffusionblocks train --out {run_dir}`")
        raise ConfigError(f"{str(run_dir)!r} is not a run directory: it has no config.json")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(path)!r} is not valid JSON: {e}") from None
    try:
        from .tasks import config_from_dict

        return config_from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{str(path)!r}: {e}") from None


def _write_weights(tmp: Path, b: int, state_dict: dict[str, torch.Tensor], step: int, cfg: RunConfig,
                   train_time_s: float) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    metadata = {"format": FORMAT, "block": str(b), "step": str(step), "train_time_s": repr(float(train_time_s)),
                "config": json.dumps(cfg.to_dict())}
    save_file(tensors, str(tmp), metadata=metadata)
    _fsync(tmp)


def save_block(run_dir: Path, b: int, state_dict: dict[str, torch.Tensor], step: int, cfg: RunConfig,
               train_time_s: float = 0.0) -> None:
    """Writes block b's inference weights with its step, training time and the run's config as metadata."""
    path = block_weights_path(run_dir, b)
    tmp = temporary_path(path)
    with _writing(path, tmp):
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
    with _writing(w_path, w_tmp, s_tmp):
        _write_weights(w_tmp, b, weights, state["step"], cfg, state.get("train_time_s", 0.0))
    with _writing(s_path, w_tmp, s_tmp):
        torch.save(state, s_tmp)
        _fsync(s_tmp)
    with _writing(w_path, w_tmp, s_tmp):
        os.replace(w_tmp, w_path)
    with _writing(s_path, s_tmp):
        os.replace(s_tmp, s_path)
    _fsync_dir(Path(run_dir))


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


# The sections that may differ between a run's blocks (--from and --resume change them): how a block was
# trained and is used, not what it computes or which noise levels it owns.
NON_IDENTITY_SECTIONS = ("name", "train", "sample", "data")


def identity(d: dict[str, Any]) -> dict[str, Any]:
    """A config dict without what may differ between blocks that chain (the task's resumable fields too)."""
    from .tasks import get_task

    out = {k: v for k, v in d.items() if k not in NON_IDENTITY_SECTIONS}
    for name in get_task(d["task"]).resumable_fields:
        section, _, field = name.partition(".")
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k != field}
    return out


def check_block_metadata(path: Path, b: int, cfg: RunConfig) -> None:
    """Refuses a weights file written for another block, or under another model, noise axis or partition."""
    meta = _weights_metadata(path)
    if "block" in meta and meta["block"] != str(b):
        raise ConfigError(f"checkpoint {str(path)!r} holds block {meta['block']}'s weights, not block {b}'s "
                          "(a file copied to the wrong name?)")
    if "config" not in meta:
        return
    try:
        from .tasks import config_from_dict

        theirs = identity(config_from_dict(json.loads(meta["config"])).to_dict())
    except (ConfigError, json.JSONDecodeError) as e:
        raise ConfigError(f"checkpoint {str(path)!r} carries an unreadable config: {e}") from None
    ours = identity(cfg.to_dict())
    if theirs != ours:
        field = first_difference(theirs, ours, "")
        raise ConfigError(f"checkpoint {str(path)!r} was trained with another {field} than this run's "
                          "config.json: it is not this run's block")


def first_difference(a: Any, b: Any, name: str) -> str:
    """The first field where two config dicts differ, with both values: 'model.depth (6, not 4)'."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{name}.{k}".lstrip("."))
    return f"{name} ({a!r}, not {b!r})"


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
    with _writing(path, tmp):
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
        _atomic_replace(tmp, path)


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
# How a recorded block came into its run: "composed" (compose) and "kept" (a block `train --from` left as it was)
# are copies, this run's file being the recorded bytes; "start" is the block `train --from` fine-tunes, the
# recorded file (the source's) being where its training starts.
COPY_ROLES = ("composed", "kept")


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
    with _writing(path, tmp):
        tmp.write_text(json.dumps({"blocks": sorted(rows, key=lambda r: r["block"])}, indent=2) + "\n")
        _atomic_replace(tmp, path)


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


def progress(run_dir: Path, b: int, cfg: RunConfig | None = None) -> dict[str, Any] | None:
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
    total = (cfg or read_config(run_dir)).train.steps_per_block
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


@contextlib.contextmanager
def _locked(path: Path, mode: str):
    """`path` opened in `mode` under an exclusive flock: appends and rewrites of a shared file do not interleave."""
    with open(path, mode) as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield f


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    """Appends one row to a run's metrics.jsonl, which the jobs training other blocks may append to as well."""
    with _writing(path), _locked(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def drop_metrics_after(path: Path, b: int, step: int) -> None:
    """Removes block b's rows after `step`: a resumed block redoes those steps and logs them again."""
    if not path.is_file():
        return
    with _writing(path), _locked(path, "r+") as f:
        lines = f.read().splitlines(keepends=True)
        kept = [line for line in lines if not _row_after(line, b, step)]
        if len(kept) != len(lines):
            f.seek(0)
            f.write("".join(kept))
            f.truncate()


def _row_after(line: str, b: int, step: int) -> bool:
    try:
        row = json.loads(line)
    except ValueError:  # a line cut short by a kill: drop it with the rows it came with
        return True
    return row.get("block") == b and row.get("step", 0) > step


class BlockClaims:
    """Exclusive locks on blocks of a run directory, so that two jobs never train one block.

    Each block's lock is an advisory lock (flock) on RUN/block_NN.lock, which holds the holder's host,
    pid and start time. The kernel releases it when the holder exits, even when killed, so a lock is
    never stale; `release` also deletes the file.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.held: dict[int, int] = {}  # block -> file descriptor

    def claim(self, b: int) -> None:
        """Takes block b's lock, or raises ConfigError naming the job that holds it."""
        if fcntl is None or b in self.held:
            return
        path = block_lock_path(self.run_dir, b)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise ConfigError(f"block {b} of {str(self.run_dir)!r} is being trained by another job ({holder}); "
                                  "wait for it to end or stop it (its lock goes with it)") from None
            # The holder before us may have deleted the file after we opened it: then the lock is on a
            # file nobody else will open, and we take the one at the path now.
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.held[b] = fd
        remove_temporaries(self.run_dir, block_weights_path(self.run_dir, b).name)
        remove_temporaries(self.run_dir, block_state_path(self.run_dir, b).name)

    def release(self) -> None:
        for b, fd in self.held.items():
            block_lock_path(self.run_dir, b).unlink(missing_ok=True)  # while still locked: nobody holds it after
            os.close(fd)
        self.held.clear()


def lock_holder(run_dir: Path, b: int) -> str | None:
    """Who holds block b's lock ("pid 12 on host, since ..."), or None when no job does."""
    if fcntl is None:
        return None
    try:
        fd = os.open(block_lock_path(run_dir, b), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(fd)
    finally:
        os.close(fd)
    return None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "holder not yet known"


def from_pretrained(run_dir: str | Path, device: str | torch.device = "cpu", stream: bool = False):
    """Loads a trained run as a BlockwiseDenoiser in eval mode; returns (model, config).

    stream: keep one block in memory at a time, loading each from disk when the sampler reaches it.
    """
    from .blocks import BlockwiseDenoiser, StreamingBlocks
    from .tasks import get_task

    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    task = get_task(cfg.task)
    missing = [b for b in range(cfg.blocks.num_blocks) if not block_weights_path(run_dir, b).is_file()]
    if missing:
        raise ConfigError(f"run {str(run_dir)!r} is missing the weights of block(s) {', '.join(map(str, missing))} "
                          f"of {cfg.blocks.num_blocks}")

    verified: set[int] = set()  # copied blocks whose sha256 was checked: streaming loads a block many times

    def load(b: int) -> torch.nn.Module:
        block = task.build_block(cfg, b)
        load_block_weights(run_dir, b, block, cfg, verify=b not in verified)
        verified.add(b)
        return block.to(device).eval()

    if stream:
        for b in range(cfg.blocks.num_blocks):  # a wrong or corrupt file fails now, not halfway through sampling
            check_block_metadata(block_weights_path(run_dir, b), b, cfg)
        return BlockwiseDenoiser(StreamingBlocks(cfg.blocks.num_blocks, load), task.partition(cfg)), cfg
    model = BlockwiseDenoiser([load(b) for b in range(cfg.blocks.num_blocks)], task.partition(cfg)).eval()
    return model, cfg
