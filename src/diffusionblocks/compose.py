"""Composing a run from the blocks of other runs (method.md section 4: blocks share no parameter).

Block b of a run denoises the noise levels of the b-th range of the partition, and nothing else ties it
to the run that trained it. So blocks trained apart (on other data, by other jobs, fine-tuned or not) can
be chained as one model, provided they agree on what chaining needs: the task, the noise axis and its
partition, and the model's shape (for images: size, channels and classes; one model config per run).

    RUN/config.json          the config of the source of block 0 (what may differ between blocks, e.g.
                             the dataset, can be overridden), validated like any run's
    RUN/block_NN.safetensors byte-for-byte copies of the sources' weights
    RUN/composition.json     where each block came from: run, its config name and data, step, the steps its
                             source asked of it, sha256 (checked by status and whenever the block is loaded)
    RUN/metrics.jsonl        each block's rows of its source's metrics
    RUN/vocab.json           a copy of the sources' vocabulary (text tasks), which they must share
    RUN/latents.json         a copy of the sources' record of their VAE (latent diffusion), which they must share

The run is written into a hidden sibling of RUN (.RUN.compose.HOST.PID.XXXX.tmp) and renamed into place
in one step: of two composes into one RUN only one succeeds, and a compose killed at any instant leaves
only its hidden sibling, which the next compose into RUN deletes once its process has ended.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from . import checkpoint, rundir
from .changes import COMPOSE, changeable, first_difference, identity, refused_overrides
from .config import ConfigError, RunConfig
from .latents import RUN_FILE as LATENTS_FILE
from .tasks import apply_overrides, get_task, read_config
from .text import VOCAB_FILE, vocabulary_difference

try:
    import fcntl
except ImportError:  # Windows: a staging directory is known to be abandoned by its pid alone
    fcntl = None

logger = logging.getLogger(__name__)

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
    ours, theirs = identity(ref), identity(cfg)
    for section in sorted(set(ours) | set(theirs), key=lambda s: list(_MEANING).index(s) if s in _MEANING else 99):
        if ours.get(section) != theirs.get(section):
            field = first_difference(theirs.get(section), ours.get(section), section)
            return f"another {_MEANING.get(section, section)}: {field}"
    return None


def check_sources(sources: dict[int, Path]) -> tuple[RunConfig, dict[int, RunConfig]]:
    """The config of block 0's source and each source's config, after refusing any block that cannot chain."""
    configs = {b: read_config(run) for b, run in sources.items()}
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
        path = rundir.block_weights_path(run, b)
        if not path.is_file():
            raise ConfigError(f"block {b} of {str(run)!r} has no weights (it is not trained yet)")
        checkpoint.check_block_metadata(path, b, cfg)  # a corrupt or misnamed file is refused here
        checkpoint.copied_block(run, b)  # and a copied one that is no longer the bytes recorded
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
    """The sources' vocabulary (they share one: `check_vocabularies`), byte for byte into the composed run `out`, and
    the record of their VAE (latent diffusion; they share one: `check_latent_spaces`)."""
    for name in (VOCAB_FILE, LATENTS_FILE):
        if (sources[0] / name).is_file():
            _copy(sources[0] / name, out / name)


def check_latent_spaces(sources: dict[int, Path]) -> None:
    """Refuses blocks trained in the latents of different VAEs (or some in latents, some in pixels)."""
    def vae(run: Path) -> str | None:
        path = run / LATENTS_FILE
        return json.loads(path.read_text()).get("vae_sha256") if path.is_file() else None

    first = vae(sources[0])
    for b, run in sorted(sources.items()):
        if vae(run) != first:
            raise ConfigError(f"block {b} of {str(run)!r} cannot chain with block 0 of {str(sources[0])!r}: its "
                              f"blocks were trained in the latents of another VAE ({LATENTS_FILE}: sha256 "
                              f"{(vae(run) or 'none, pixels')[:16]}, not {(first or 'none, pixels')[:16]})")


def source_record(run: Path, b: int, cfg: RunConfig, carry: bool = True) -> dict[str, Any]:
    """Where block b of `run` (whose config is cfg) comes from, for the composition.json of a run that copies it.

    carry: a block that `run` itself copied from elsewhere keeps its record (the run that trained it, with its
    data and the steps it was asked for), `run` added to its `via`. (The caller has checked its sha256, as
    check_sources does.) Otherwise the record describes block b of `run` as it is.
    """
    path = rundir.block_weights_path(run, b)
    row = checkpoint.block_source(run, b)
    if carry and checkpoint.is_copy(row):
        return {**row, "via": [*row.get("via", []), str(run.resolve())]}
    info = checkpoint.block_info(run, b)
    return {"block": b, "run": str(run.resolve()), "run_name": cfg.name, "data": cfg.to_dict().get("data"),
            "step": info["step"], "steps_per_block": cfg.train.steps_per_block, "sha256": checkpoint.sha256_file(path)}


def copy_block(run: Path, b: int, cfg: RunConfig, out: Path, role: str) -> dict[str, Any]:
    """Copies block b's weights from `run` (config cfg) into the directory `out`, byte for byte; returns its record.

    role: how it comes into the new run (checkpoint.COPY_ROLES).
    """
    row = {**source_record(run, b, cfg), "role": role}
    dst = rundir.block_weights_path(out, b)
    _copy(rundir.block_weights_path(run, b), dst)
    if checkpoint.sha256_file(dst) != row["sha256"]:
        raise ConfigError(f"block {b} of {str(run)!r} changed while it was copied; copy it again")
    return row


def _copy(src: Path, dst: Path) -> None:
    """src to dst byte for byte, flushed to disk, through a temporary of this process: dst is whole or absent."""
    tmp = rundir.temporary_path(dst)
    try:
        shutil.copyfile(src, tmp)
        rundir.atomic_replace(tmp, dst)
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


def write_composed_run(target: Path, sources: dict[int, Path], configs: dict[int, RunConfig], cfg: RunConfig) -> None:
    """Writes into the empty directory `target` the files of the run whose block b is block b of sources[b]:
    the blocks, their metrics, the sources' vocabulary (text tasks), config.json (cfg) and composition.json."""
    rows = []
    for b, run in sorted(sources.items()):
        rows.append(copy_block(run, b, configs[b], target, "composed"))
        if rows[-1]["step"] < rows[-1]["steps_per_block"]:
            logger.warning("block %d of %s is partly trained (step %d of %d): the composed run keeps it as it is",
                           b, run, rows[-1]["step"], rows[-1]["steps_per_block"])
    _copy_metrics(sources, target)
    copy_vocabulary(sources, target)
    rundir.save_config(target, cfg)
    checkpoint.save_composition(target, rows)


def compose_run(sources: dict[int, Path], out: Path, overrides: list[str] = ()) -> RunConfig:
    """Writes a run directory `out` (new or empty) whose block b is a copy of block b of sources[b].

    The run is written in a hidden sibling of `out` and renamed to `out` once whole (see the module's docstring).
    """
    ref, configs = check_sources(sources)
    check_vocabularies(sources)
    check_latent_spaces(sources)
    bad = refused_overrides(ref, overrides, COMPOSE, restated_ok=False)
    if bad:
        raise ConfigError(f"override {bad[0]!r}: a composed run may only set {', '.join(changeable(COMPOSE, ref))}; "
                          "the rest is what its blocks were trained as")
    cfg = apply_overrides(ref, [f"name={ref.name}-composed", *overrides])
    get_task(cfg.task).load_run_data(cfg, sources[0])  # the data it will be evaluated on, as its blocks read it
    check_free(out)
    with staging(out) as target:
        try:
            write_composed_run(target, sources, configs, cfg)
        except (OSError, rundir.CheckpointWriteError) as e:  # (the hidden directory's name would say nothing)
            reason = e.reason if isinstance(e, rundir.CheckpointWriteError) else e.strerror or str(e)
            raise ConfigError(f"could not write the composed run {str(out)!r}: {reason}; nothing of it was left "
                              "behind") from None
        publish(target, out)
    return cfg


def check_free(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r} already exists and is not an empty directory; choose another")


_STAGING = re.compile(r"\.(?P<name>.+)\.compose\.(?P<host>.+)\.(?P<pid>\d+)\.[^.]+\.tmp")


@contextlib.contextmanager
def staging(out: Path):
    """A new hidden directory beside `out`, locked while this process lives, deleted if the block raises."""
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_stagings(out)
    target = Path(tempfile.mkdtemp(prefix=f".{out.name}.compose.{socket.gethostname()}.{os.getpid()}.", suffix=".tmp",
                                   dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(target, 0o777 & ~umask)  # what mkdir gives, not mkdtemp's owner-only mode: it becomes the run
    fd = None
    try:
        if fcntl is not None:
            fd = os.open(target, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield target
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        for parent in made:  # the parents this compose created, if nothing else went in them
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _remove_abandoned_stagings(out: Path) -> None:
    """Deletes the staging directories of composes into `out` that were killed: their process, on this host, has
    ended (and, where the platform has locks, nobody holds theirs)."""
    for path in out.parent.glob(f".{glob.escape(out.name)}.compose.*.tmp"):
        m = _STAGING.fullmatch(path.name)
        if not m or m["name"] != out.name or m["host"] != socket.gethostname() or \
                rundir.pid_alive(int(m["pid"])) or not path.is_dir():
            continue
        if fcntl is None:
            shutil.rmtree(path, ignore_errors=True)
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # another compose deleted it first
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s, left by a compose that was killed", path)
        except BlockingIOError:  # another compose is removing it
            pass
        finally:
            os.close(fd)


def publish(target: Path, out: Path) -> None:
    """Renames the whole run `target` to `out`, which must not exist or be empty: atomic, so that of two composes
    into one `out` exactly one succeeds, and the other's files never mix with it."""
    rundir.fsync_dir(target)
    try:
        try:
            os.rename(target, out)  # POSIX: onto a missing or an empty directory, in one step
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not out.is_dir() or any(out.iterdir()):
                raise
            out.rmdir()  # (where a rename does not replace an empty directory)
            os.rename(target, out)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR, errno.ENOENT) and out.exists():
            raise ConfigError(f"--out {str(out)!r} was filled by another command while this one composed; this "
                              "composition was not written: choose another --out") from None
        raise
    rundir.fsync_dir(out.parent)
