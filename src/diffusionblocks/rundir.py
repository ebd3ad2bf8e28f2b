"""The files of a run directory, written so that no process sees half a file and no two jobs collide.

    RUN/config.json                the full RunConfig (read_config_dict, save_config, join_run)
    RUN/block_00.safetensors       block 0's inference weights      } written by checkpoint.py
    RUN/block_00.state.pt          block 0's training state         }
    RUN/block_00.lock              exists while a job trains block 0 (it holds a lock on it: BlockClaims)
    RUN/metrics.jsonl              one JSON line per logging interval and block (append_metrics)
    RUN/composition.json           where copied blocks came from (checkpoint.py)

Every file is written under a temporary name of its own process, flushed to disk and renamed, so a
killed process never leaves half a file; a temporary left by a killed process is recognised by its
name (host and pid) and removed. A job that trains a block holds an exclusive lock on the block's lock
file, which the operating system releases when the job ends, however it ends. metrics.jsonl is shared
by every job of a run: its rows are appended and rewritten under a lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from .config import ConfigError, RunConfig

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, blocks are not claimed
    fcntl = None


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


def fsync_file(tmp: Path) -> None:
    """Flushes a written file to disk, with the permissions a plain new file would get."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(directory: Path) -> None:
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


def atomic_replace(tmp: Path, path: Path) -> None:
    """Moves a fully written temporary file into place."""
    fsync_file(tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def writing(path: Path, *tmps: Path):
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
    with writing(path, tmp):
        tmp.write_text(text, encoding="utf-8")
        atomic_replace(tmp, path)


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
    with writing(path, tmp):
        tmp.write_text(cfg.to_json() + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        try:
            existing, why = type(cfg).from_dict(read_config_dict(run_dir)), ""
        except ConfigError as e:
            existing, why = None, f" (it cannot be read as this job's: {e})"
        if existing != cfg:
            raise ConfigError(f"{str(path)!r} holds a different config than this job's{why}; a job joining a run "
                              "must use the run's config") from None
    finally:
        tmp.unlink()


def read_config_dict(run_dir: str | Path) -> dict[str, Any]:
    """The parsed config.json of a run directory, with a clear error when it is not one (the task registry reads
    it into its task's config: `diffusionblocks.tasks.read_config`)."""
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
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(path)!r} is not valid JSON: {e}") from None


@contextlib.contextmanager
def _locked(path: Path, mode: str):
    """`path` opened in `mode` under an exclusive flock: appends and rewrites of a shared file do not interleave."""
    with open(path, mode) as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield f


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    """Appends one row to a run's metrics.jsonl, which the jobs training other blocks may append to as well."""
    with writing(path), _locked(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def drop_metrics_after(path: Path, b: int, step: int) -> None:
    """Removes block b's rows after `step`: a resumed block redoes those steps and logs them again."""
    if not path.is_file():
        return
    with writing(path), _locked(path, "r+") as f:
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


def code_version(*also: Path) -> str:
    """The commit this package's code is at, with "+changes" when the package (or one of the paths `also`) differs
    from it; "diffusionblocks <version>" outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", str(here),
                                *map(str, also)], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"diffusionblocks {version('diffusionblocks')}"
    return commit + ("+changes" if dirty else "")

