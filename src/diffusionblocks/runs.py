"""A run's life, from Python: train (a new run, --resume, --from, --blocks), sample, evaluate, status.

Each function does everything its command does (`diffusionblocks train`, `sample`, `evaluate`,
`status`): the same checks before any work, the same files and messages, the same `ConfigError`s.
The command only parses its arguments and calls them (cli.py). docs/python.md shows them in use:

    run = train_run("presets/digits-thick-dit.json", "runs/thick")          # a new run
    train_run(resume=run, overrides=["train.steps_per_block=2000"])         # continue it, longer
    tuned = train_run(from_=run, blocks=[1], overrides=["train.lr=1e-4"])  # fine-tune block 1 into a new run
    sample_run(run, out="grid.png", num=100)
    evaluated = evaluate_run(run, num=1000)

A new run's directory is made, or an empty one (or one that never trained) taken; nothing a user has
is overwritten. When a command fails before any block was checkpointed, the directory it made is
removed, so the corrected command starts afresh; otherwise `resume` continues it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, distributed, pilot, precision, rundir
from .changes import FROM, RESUME, changeable, first_difference, refused_overrides
from .compose import copy_block, source_record
from .config import ConfigError, RunConfig
from .memory import PeakMemory
from .options import EvaluateOptions, SampleOptions, make_options, replace_options
from .plotting import plot_losses
from .pretrained import from_pretrained
from .tasks import (EvaluatingTask, SamplingTask, Task, apply_overrides, default_config, get_task, load_config,
                    read_config)
from .train import init_block_state, train

logger = logging.getLogger("diffusionblocks")


# ---- checks of what a command is given


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device a command runs on: `name`, or CUDA when available and the CPU otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device name (try cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def _writable_place(path: Path, what: str) -> None:
    """Refuses a path that cannot be created: a file where a directory must be, or a directory not writable."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is a file")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is not writable")
            return


def check_output_file(path: Path, flag: str = "--out") -> None:
    """Refuses an output file that is a directory, or whose directory cannot be made or written."""
    if path.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a directory; give a file name")
    _writable_place(path, flag)


def check_output_dir(path: Path, flag: str = "--out") -> None:
    """Refuses an output directory that is a file, is not writable, or cannot be made."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a file, not a directory")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {str(path)!r} is not writable")
    _writable_place(path, flag)


def parse_blocks(blocks: str | Sequence[int] | None, B: int) -> list[int]:
    """The blocks to train: "1,3" or [1, 3] -> [1, 3]; None -> every block."""
    if blocks is None:
        return list(range(B))
    text = blocks if isinstance(blocks, str) else ",".join(map(str, blocks))
    try:
        chosen = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise ConfigError(f"--blocks {text!r} is not a comma-separated list of block indices") from None
    bad = [b for b in chosen if not 0 <= b < B]
    if bad or not chosen:
        raise ConfigError(f"--blocks {text!r}: the model has blocks 0..{B - 1}")
    return chosen


def train_config(config: RunConfig | str | Path | None = None, overrides: Sequence[str] = (), *,
                 resume: str | Path | None = None, from_: str | Path | None = None,
                 out: str | Path | None = None) -> RunConfig:
    """The config a training command runs: the run's own (resume, from_) with the overrides it allows
    (diffusionblocks.changes), or `config` (a RunConfig, a JSON file, or None: the default config) with the
    overrides."""
    base = resume or from_
    overrides = list(overrides)
    if base is not None:
        if config is not None:
            raise ConfigError(f"--{'resume' if resume else 'from'} uses the run's own config.json; "
                              "do not pass --config too")
        if resume and out is not None and Path(out) != Path(resume):
            raise ConfigError(f"--resume continues {resume} in place; --out {out} would be ignored")
        cfg = read_config(base)
        operation = RESUME if resume else FROM
        bad = refused_overrides(cfg, overrides, operation)
        if bad:
            raise ConfigError(f"override {bad[0]!r} would change what the run {base} is; only "
                              f"{', '.join(changeable(operation, cfg))} may change with --{operation}")
        new = apply_overrides(cfg, overrides)
        if resume and cfg.train.lr_schedule != "constant" and new.train.steps_per_block != cfg.train.steps_per_block:
            raise ConfigError(f"train.steps_per_block={new.train.steps_per_block}: the run {base} decays its learning "
                              f"rate to its last step (train.lr_schedule={cfg.train.lr_schedule!r}), so its "
                              f"{cfg.train.steps_per_block} steps are fixed; train another run for a longer budget "
                              f"(train --from {base} starts one from its weights)")
        return new
    if isinstance(config, RunConfig):
        return apply_overrides(config, overrides)
    return apply_overrides(load_config(config) if config is not None else default_config(), overrides)


# ---- the run directory a training command trains into


def _has_block_files(run_dir: Path) -> bool:
    return any(run_dir.glob("block_*.safetensors")) or any(run_dir.glob("block_*.state.pt"))


def _new_run_dir(out: str | Path | None, runs_root: str | Path, name: str) -> tuple[Path, bool]:
    """The directory of a new run, and whether this command created it.

    `out` may name a directory that does not exist, an empty one, a run that never trained (its
    config.json and nothing of any block: a run stopped before its first checkpoint is started again), or
    one holding only what a killed command left (locks nobody holds, temporaries of ended processes).
    None: a new numbered directory under runs_root.
    """
    if out is None:
        check_output_dir(Path(runs_root), "--runs-root")
        return rundir.new_run_dir(runs_root, name), True
    run_dir = Path(out)
    check_output_dir(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        if rundir.leftovers_only(run_dir):
            logger.info("%s holds only what a killed command left: starting the run in it", run_dir)
            rundir.clear_leftovers(run_dir)
        elif not (run_dir / "config.json").is_file() or _has_block_files(run_dir):
            raise ConfigError(f"run directory {str(run_dir)!r} already exists and is not empty; "
                              f"use --resume {run_dir} to continue it, or choose another --out")
        else:
            logger.info("%s never trained (no block has a checkpoint): starting it again", run_dir)
    try:
        run_dir.mkdir(parents=True)
        return run_dir, True
    except FileExistsError:
        return run_dir, False


def _copy_untouched_blocks(src: Path, dst: Path, blocks: list[int], B: int, reinit: bool) -> None:
    """Copies the weights, states and metrics of the blocks not being retrained, byte for byte, and records in
    composition.json where each kept block and each fine-tuned block's starting weights come from."""
    src_cfg = read_config(src)
    keep = [b for b in range(B) if b not in blocks]
    rows = []
    for b in keep:
        if rundir.block_weights_path(src, b).is_file():
            rows.append(copy_block(src, b, src_cfg, dst, "kept"))
        if rundir.block_state_path(src, b).is_file():
            shutil.copy2(rundir.block_state_path(src, b), rundir.block_state_path(dst, b))
    if not reinit:  # what --resume starts them from again if this run is stopped before their first checkpoint
        rows += [{**source_record(src, b, src_cfg, carry=False), "role": "start"} for b in blocks]
    if rows:
        checkpoint.save_composition(dst, rows)
    if (src / "metrics.jsonl").is_file():
        lines = [line for line in (src / "metrics.jsonl").read_text().splitlines()
                 if line.strip() and json.loads(line).get("block") in keep]
        (dst / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def _blocks_to_resume(task: Task, run_dir: Path, cfg: RunConfig, blocks: list[int],
                      named: bool) -> tuple[list[int], dict[int, Path]]:
    """Checks every block of a resumed run before anything trains; returns the blocks that have steps to do, and
    the run whose weights each of them starts from (the blocks `train --from` fine-tunes that have no state yet).

    A block's training state says where it continues, and no state means step 0. Weights without a state
    (the first checkpoint cut short, or a state deleted to save space) count as the block's result only
    when they are final; otherwise the block trains from the start: from the weights it was to be fine-tuned
    from, for a block of `train --from` (checked against their recorded sha256), else from scratch. Weights
    older than their state (restored by hand) are rewritten from it.

    A block copied from another run (by compose, or kept by --from) is that run's result and is never trained
    here: it is complete when it reached the steps its source asked of it. A copy its source left partly
    trained cannot be continued without its source's training state: it is kept as it is, with a warning,
    and refused when named by --blocks (named).
    """
    total, todo, starts, partial = cfg.train.steps_per_block, [], {}, []
    if pilot.needs_pilot(cfg):  # stopped in its pilot: no block has trained (they train with its boundaries)
        if any(rundir.block_weights_path(run_dir, b).is_file() for b in blocks):
            raise ConfigError(f"{str(run_dir)!r} has block weights but no fitted boundaries in its config.json: "
                              "a balanced run's blocks train only after its pilot; it was changed by hand")
        return list(blocks), {}
    for b in blocks:
        path = rundir.block_weights_path(run_dir, b)
        if path.is_file():
            checkpoint.check_block_metadata(path, b, cfg)
        source = checkpoint.block_source(run_dir, b)
        if checkpoint.is_copy(source):
            if not path.is_file():
                raise ConfigError(f"block {b} of {str(run_dir)!r} was copied from {source['run']!r} and its weights "
                                  "file is gone: copy it again (compose, or train --from)")
            checkpoint.copied_block(run_dir, b)  # still the bytes recorded
            step, target = checkpoint.block_step(run_dir, b), int(source["steps_per_block"])
            if step >= target:
                logger.info("block %d: a copy of block %d of %s, trained there to its end (step %d): kept as it is",
                            b, b, source["run"], step)
            else:
                partial.append((b, source, step, target))
            continue
        step = checkpoint.state_step(run_dir, b)
        if step is None:
            info = checkpoint.block_info(run_dir, b)
            if info is not None and info["step"] >= total:
                continue
            if source is not None:  # a block of `train --from`, stopped before its state was first written
                start = Path(source["run"])
                if not rundir.block_weights_path(start, b).is_file():
                    raise ConfigError(f"block {b} is fine-tuned from block {b} of {str(start)!r}, whose weights are "
                                      f"gone: start the fine-tuning again with train --from RUN --blocks {b}")
                checkpoint.check_recorded_sha256(rundir.block_weights_path(start, b), source,
                                                 f"block {b} of {str(run_dir)!r} was to be fine-tuned from it")
                starts[b] = start
            if info is not None:
                logger.info("block %d: its weights (step %d) have no training state to continue from: training it "
                            "from the start%s", b, info["step"], f" (the weights of {starts[b]})" if b in starts else "")
        elif step > total:
            raise ConfigError(f"train.steps_per_block={total} is below the {step} steps block {b} has trained; "
                              "a block cannot be made to have trained less")
        init_block_state(task, cfg, b, torch.device("cpu"), run_dir, starts)  # raises on a corrupt or mismatched state
        if checkpoint.repair_block(run_dir, b, cfg):
            logger.info("block %d: its weights were older than its training state; rewrote them from it", b)
        todo.append(b)
    if partial:
        b, source, step, target = partial[0]
        others = f" (and block(s) {[p[0] for p in partial[1:]]} likewise)" if len(partial) > 1 else ""
        message = (f"block {b} is a copy of block {b} of {source['run']}, which stopped at step {step} of its {target}, "
                   f"and {str(run_dir)!r} has no training state to continue it{others}: continue it in its source and "
                   f"copy it again, or fine-tune it into a new run with train --from {run_dir} --blocks {b}")
        if named:
            raise ConfigError(message)
        logger.warning("%s; kept as it is", message)
    return todo, starts


@dataclass(frozen=True)
class _Prepared:
    """What _prepare_run_dir decided: where to train, which blocks, from which run, and the locks it holds."""

    run_dir: Path
    blocks: list[int]
    init_from: Path | dict[int, Path] | None
    claims: rundir.BlockClaims
    created: bool  # whether this command made the directory (and so may remove it when it fails early)


def _prepare_run_dir(task: Task, cfg: RunConfig, blocks: list[int], *, out: str | Path | None, runs_root: str | Path,
                     resume: str | Path | None, from_: str | Path | None, named: bool, reinit: bool) -> _Prepared:
    """The run directory to train into (created or checked, config written), with the blocks to train claimed.
    named: the blocks were chosen (--blocks), not every block of the run."""
    B = cfg.blocks.num_blocks
    if resume is not None:
        run_dir = Path(resume)
        claims = _claim(run_dir, blocks)
        try:
            todo, starts = _blocks_to_resume(task, run_dir, cfg, blocks, named=named)
            rundir.save_config(run_dir, cfg)
        except BaseException:
            claims.release()
            raise
        return _Prepared(run_dir, todo, starts or None, claims, False)
    if from_ is not None:
        src = Path(from_)
        for b in range(B):
            checkpoint.block_step(src, b)  # raises on a corrupt weights file
        missing = [b for b in blocks if checkpoint.block_step(src, b) is None]
        if missing and not reinit:
            raise ConfigError(f"--from {src}: block(s) {missing} have no weights to fine-tune; pass --reinit to "
                              "train them from scratch")
        for b in range(B):
            if rundir.block_weights_path(src, b).is_file():
                checkpoint.check_block_metadata(rundir.block_weights_path(src, b), b, cfg)
                checkpoint.copied_block(src, b)  # a copied block must still be the bytes recorded
        run_dir, created = _new_run_dir(out, runs_root, f"{cfg.name}-B{B}-{'retrain' if reinit else 'finetune'}"
                                                        f"-b{'-'.join(map(str, blocks))}")
        prepared = _Prepared(run_dir, blocks, None if reinit else src, _claim(run_dir, range(B)), created)
        with _undo_on_failure(prepared, B):
            _copy_untouched_blocks(src, run_dir, blocks, B, reinit)
            rundir.save_config(run_dir, cfg)
        return prepared
    if named and out is not None:
        # An independent job of a block-wise run (a Slurm array task): make or join the shared run directory.
        run_dir = Path(out)
        check_output_dir(run_dir)
        try:
            run_dir.mkdir(parents=True)
            created = True
        except FileExistsError:
            created = False
        rundir.join_run(run_dir, replace_train(cfg, blocks_to_train=None))  # each job's own choice is not the run's
        claims = _claim(run_dir, blocks)
        taken = [b for b in blocks if checkpoint.block_step(run_dir, b) is not None
                 or rundir.block_state_path(run_dir, b).exists()]
        if taken:
            claims.release()
            raise ConfigError(f"block(s) {taken} of {str(run_dir)!r} already have checkpoints; continue them with "
                              f"--resume {run_dir} --blocks {','.join(map(str, taken))}")
        return _Prepared(run_dir, blocks, None, claims, created)
    run_dir, created = _new_run_dir(out, runs_root, f"{cfg.name}-B{B}")
    # The blocks are claimed before the config is written: a job already training in it keeps its own.
    prepared = _Prepared(run_dir, blocks, None, _claim(run_dir, range(B)), created)
    with _undo_on_failure(prepared, B):
        rundir.save_config(run_dir, cfg)
    return prepared


@contextlib.contextmanager
def _undo_on_failure(prepared: _Prepared, B: int):
    try:
        yield
    except BaseException:
        _discard_untrained(prepared, B)
        prepared.claims.release()
        raise


def _claim(run_dir: Path, blocks) -> rundir.BlockClaims:
    """Locks the blocks for this job, or raises ConfigError naming the job that holds one (and holds none)."""
    claims = rundir.BlockClaims(run_dir)
    try:
        for b in blocks:
            claims.claim(b)
    except ConfigError:
        claims.release()
        raise
    return claims


def _discard_untrained(prepared: _Prepared, B: int) -> None:
    """Removes a run directory this command created when it failed before any block was checkpointed,
    so that the corrected command starts afresh. Only when no other job holds a block of it."""
    run_dir = prepared.run_dir
    kept = _has_block_files(run_dir) or (run_dir / pilot.PILOT_DIR).is_dir()  # blocks, or a balanced partition's pilot
    if not prepared.created or not run_dir.is_dir() or kept:
        return
    try:
        for b in range(B):
            prepared.claims.claim(b)
    except (ConfigError, OSError):
        return
    prepared.claims.release()
    shutil.rmtree(run_dir, ignore_errors=True)


def _data_run(out: str | Path | None, resume: str | Path | None, from_: str | Path | None,
              named: bool) -> Path | None:
    """The run whose files (a vocabulary) the training data is read through: the run fine-tuned from, or the run
    resumed or joined (`--blocks` into `--out`) once it has a block's files; None: the data makes its own."""
    if from_ is not None:
        return Path(from_)
    run = resume if resume is not None else out if named else None
    return Path(run) if run is not None and Path(run).is_dir() and _has_block_files(Path(run)) else None


# ---- train


def train_run(config: RunConfig | str | Path | None = None, out: str | Path | None = None, *,
              overrides: Sequence[str] = (), resume: str | Path | None = None, from_: str | Path | None = None,
              blocks: str | Sequence[int] | None = None, reinit: bool = False, runs_root: str | Path = "runs",
              device: str | torch.device | None = None, progress: bool = True,
              on_run_dir: Callable[[Path], None] | None = None) -> Path:
    """Trains a run, as `diffusionblocks train` does; returns its directory.

    Args:
        config: a RunConfig, a JSON config file, or None: the default config (the digits DiT), or with `resume`
            or `from_` the run's own config.json (then it must be None).
        out: the new run's directory (must not exist, be empty, or be a run that never trained); None: a new
            numbered directory under `runs_root`. With `blocks`, the shared directory of a block-wise run whose
            jobs each train their blocks (made, or joined when another job made it).
        overrides: "section.field=value" changes of the config; with `resume` or `from_` only those that
            diffusionblocks.changes allows.
        resume: continue this run in place from its checkpoints.
        from_: a new run from this trained one: `blocks` are fine-tuned from its weights (trained from scratch
            with `reinit`), the other blocks' files are copied unchanged.
        blocks: train only these blocks ([1, 3], or "1,3"); None: every block.
        device: "cpu", "cuda"...; None: CUDA when available.
        progress: progress bars.
        on_run_dir: called with the run directory once it is known, before any training (the command keeps it to
            say how to continue a run that is interrupted).
    """
    t_start = time.perf_counter()
    # Everything that can be wrong is checked before any training time is spent.
    if resume and from_:
        raise ConfigError("--resume continues a run in place and --from starts a new one from it: pass one of them")
    if reinit and not from_:
        raise ConfigError("--reinit needs --from RUN (it retrains chosen blocks of RUN from scratch)")
    cfg = train_config(config, overrides, resume=resume, from_=from_, out=out)
    blocks = cfg.train.blocks_to_train if blocks is None else blocks
    B, named = cfg.blocks.num_blocks, blocks is not None
    chosen = parse_blocks(blocks, B)
    device = resolve_device(device)
    precision.resolve(cfg.train.precision, device)  # e.g. tf32 on a CPU: refused now
    if distributed.launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if cfg.train.schedule != "parallel":
            raise ConfigError(f"launched on {world} ranks by torchrun: use --schedule parallel "
                              f"(train.schedule is {cfg.train.schedule!r})")
        for r in range(world):
            k = distributed.assign(r, world, chosen).shard[1]
            if cfg.train.batch_size % k:
                raise ConfigError(f"train.batch_size={cfg.train.batch_size} does not split evenly over the {k} "
                                  f"data-parallel ranks of a block ({world} ranks for {len(chosen)} block(s))")
    task = get_task(cfg.task)
    pilot.check_pilot(task, cfg)
    if pilot.needs_pilot(cfg) and (named or distributed.launched_by_torchrun()):
        raise ConfigError("a balanced partition is fitted by one pilot before any block trains, which block-wise jobs "
                          "and torchrun ranks cannot share: train the run once without --blocks or torchrun, or give "
                          "blocks.boundaries (a fitted run's partition.json has them)")
    source = _data_run(out, resume, from_, named)
    data = task.load_run_data(cfg, source) if source is not None else task.load_data(cfg)  # raises when it does
    task.check_after_training(cfg, data)  # not fit the model, or what the finished run does with it cannot be done
    if cfg.train.distill_weight > 0:
        check_teacher(task, cfg)
    rank, world, device = distributed.init(device)
    prepared = None
    try:
        # Rank 0 makes or checks the run directory; every rank learns its path, or the error, from it.
        if rank == 0:
            try:
                prepared = _prepare_run_dir(task, cfg, chosen, out=out, runs_root=runs_root, resume=resume, from_=from_,
                                            named=named, reinit=reinit)
                found: tuple | str = (prepared.run_dir, prepared.blocks, prepared.init_from)
            except ConfigError as e:
                found = str(e)
        found = distributed.broadcast_object(found if rank == 0 else None)
        if isinstance(found, str):
            raise ConfigError(found)
        run_dir, todo, init_from = found
        if on_run_dir is not None:
            on_run_dir(run_dir)
        if pilot.needs_pilot(cfg):  # one process (checked above)
            cfg = pilot.fit_partition(task, cfg, run_dir, device, lambda c, d: _train_pilot(c, d, device, progress))
            rundir.save_config(run_dir, cfg)
        if rank == 0:
            task.prepare_run(cfg, run_dir, data)
            logger.info("run directory: %s", run_dir)
            logger.info("task %s: %s training / %s held-out examples; B=%d blocks of %s layers, training block(s) "
                        "%s, %s schedule, %d steps per block, device %s%s", cfg.task, _size(data.train),
                        _size(data.test), B, list(cfg.layer_split()), todo, cfg.train.schedule,
                        cfg.train.steps_per_block, device, _starting_from(init_from))
        with PeakMemory(device) as mem:
            train(_with_teacher(task, cfg, device), cfg, data.train, run_dir, device=device, blocks=todo,
                  progress=progress, init_from=init_from, claim=False)
        distributed.barrier()
        if rank == 0:
            _finish_run(task, cfg, run_dir, chosen, mem, device, t_start)
    except (ConfigError, OSError):
        if prepared is not None:
            _discard_untrained(prepared, B)
        raise
    finally:
        if prepared is not None:
            prepared.claims.release()
        distributed.shutdown()
    return Path(run_dir)


def _train_pilot(cfg: RunConfig, pilot_dir: Path, device: torch.device, progress: bool) -> None:
    """Trains a balanced partition's pilot run, or resumes it where an earlier attempt stopped."""
    if (pilot_dir / "train_summary.json").is_file():
        return
    if (pilot_dir / "config.json").is_file():
        train_run(resume=pilot_dir, device=device, progress=progress)
    else:
        train_run(cfg, out=pilot_dir, device=device, progress=progress)


def replace_train(cfg: RunConfig, **fields: Any) -> RunConfig:
    """cfg with some fields of its train section replaced."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **fields))


class DistillingTask:
    """A run's task whose blocks' loss inputs also carry the teacher's denoised output at the same noisy input
    (`Task.distillation_inputs`), drawn without gradient; the trainer sees it as the task itself."""

    def __init__(self, task: Task, teacher: torch.nn.Module):
        self.task, self.teacher = task, teacher

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def loss_inputs(self, cfg: RunConfig, partition, b: int, batch: Any, generator: torch.Generator) -> dict[str, Any]:
        inputs = self.task.loss_inputs(cfg, partition, b, batch, generator)
        with torch.no_grad():
            return {**inputs, **self.task.distillation_inputs(cfg, self.teacher, inputs)}


def check_teacher(task: Task, cfg: RunConfig) -> RunConfig:
    """The config of cfg's teacher run (train.teacher), after refusing a task without distillation, and a teacher
    that cannot teach cfg's blocks: another task, more than one block, another noise axis, another model but for
    its depth."""
    if not task.distills(cfg):
        raise ConfigError(f"task {cfg.task!r} has no distillation: train.distill_weight must be 0")
    teacher = Path(cfg.train.teacher)
    what = f"train.teacher={str(teacher)!r}"
    try:
        tcfg = read_config(teacher)
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None
    if tcfg.blocks.num_blocks != 1:
        raise ConfigError(f"{what} has B={tcfg.blocks.num_blocks} blocks; a teacher is an end-to-end run (B=1)")
    ours, theirs = _what_blocks_denoise(cfg), _what_blocks_denoise(tcfg)
    if ours != theirs:
        raise ConfigError(f"{what} has another {first_difference(theirs, ours, '')}: it does not denoise what this "
                          "run's blocks denoise")
    return tcfg


def _what_blocks_denoise(cfg: RunConfig) -> dict[str, Any]:
    """The parts of a config a teacher must share with the blocks it teaches: task, noise axis, model but its depth."""
    d = cfg.to_dict()
    return {"task": d["task"], "noise": d.get("noise"),
            "model": {k: v for k, v in (d.get("model") or {}).items() if k != "depth"}}


def _with_teacher(task: Task, cfg: RunConfig, device: torch.device) -> Task | DistillingTask:
    """The task the trainer is handed: `task`, or with train.distill_weight > 0 the task distilling from the teacher
    run, loaded on the device in eval mode (its memory counts in the run's peak)."""
    if cfg.train.distill_weight <= 0:
        return task
    teacher, _ = from_pretrained(cfg.train.teacher, device)
    return DistillingTask(task, teacher.requires_grad_(False))


def _starting_from(init_from: Path | dict[int, Path] | None) -> str:
    if isinstance(init_from, dict):
        return "".join(f", block {b} starting from {run}'s" for b, run in sorted(init_from.items()))
    return f", starting from {init_from}" if init_from else ""


def _size(split) -> str:
    try:
        return str(len(split))
    except TypeError:  # a stream without a length
        return "?"


def _finish_run(task: Task, cfg: RunConfig, run_dir: Path, blocks: list[int], mem: PeakMemory, device: torch.device,
                t_start: float) -> None:
    """train_summary.json, loss.png and, once every block is trained, what the task shows (samples, evaluation)."""
    B = cfg.blocks.num_blocks
    infos = [checkpoint.block_info(run_dir, b) for b in range(B)]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    summary = {"blocks": [{**i, "steps_per_s": i["step"] / i["train_time_s"] if i["train_time_s"] > 0 else None}
                          for i in infos if i is not None],
               "trained_now": blocks, "schedule": cfg.train.schedule,
               "world_size": world, "peak_train_memory_bytes": mem.peak_bytes,
               "memory_measure": mem.kind + (" (rank 0)" if world > 1 else ""),
               "device": str(device), "code": rundir.code_version()}
    for row in summary["blocks"]:
        row["steps"] = row.pop("step")
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png", B, title=f"{cfg.name}, B={B}")
    missing = [b for b, i in enumerate(infos) if i is None]
    if missing:
        logger.info("blocks %s are not trained yet: nothing to sample or evaluate until every block is", missing)
    else:
        summary.update(task.after_training(cfg, run_dir, device))
    summary["wall_time_s"] = time.perf_counter() - t_start
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for row in summary["blocks"]:
        logger.info("block %d: %d steps in %.1f s (%.1f steps/s)", row["block"], row["steps"], row["train_time_s"],
                    row["steps_per_s"] or 0.0)
    logger.info("wrote %s (loss.png, metrics.jsonl, train_summary.json) in %.1f s", run_dir, summary["wall_time_s"])


# ---- sample and evaluate


def _options(cls: type, options: Any, values: dict[str, Any], what: str) -> Any:
    """The options a verb runs with: `options` (an instance of the task's class `cls`) or its defaults, with the
    keyword `values` in their place, each checked."""
    if options is None:
        return make_options(cls, values, what)
    if not isinstance(options, cls):
        raise ConfigError(f"the {what} are {cls.__module__}.{cls.__name__}, not {type(options).__name__}")
    return replace_options(options, values, what) if values else options


def sample_run(run_dir: str | Path, options: SampleOptions | None = None, **values: Any) -> Path:
    """Draws samples from a trained run into a file, as `diffusionblocks sample` does; returns the file.

    options: the run's task's sample options (`get_task(cfg.task).sample_options`, which extends SampleOptions);
    values: options by name instead, or in place of some of `options`' ("out", "num", the task's "steps"...).
    """
    cfg = read_config(run_dir)
    task = get_task(cfg.task)
    if not isinstance(task, SamplingTask) or not task.sample_suffixes:
        raise ConfigError(f"{run_dir} is a {cfg.task!r} run: it has nothing to sample; use "
                          f"`diffusionblocks evaluate {run_dir}`")
    options = _options(task.sample_options, options, values, f"sample options of task {cfg.task!r}")
    if options.out is None:
        raise ConfigError("--out must be given: the file the samples go to")
    out = Path(options.out)
    if out.suffix.lower() not in task.sample_suffixes:
        raise ConfigError(f"--out {options.out!r} must end in {' or '.join(task.sample_suffixes)}")
    check_output_file(out)
    if out.exists() and not options.overwrite:
        raise ConfigError(f"--out {options.out!r} already exists; pass --overwrite to replace it")
    if options.num < 1:
        raise ConfigError(f"--num must be at least 1, got {options.num}")
    device = resolve_device(options.device)
    options = dataclasses.replace(options, device=str(device))
    mode = precision.resolve(options.precision, device)
    model, cfg = from_pretrained(run_dir, device, stream=options.stream)
    out.parent.mkdir(parents=True, exist_ok=True)
    with precision.matmul_mode(mode), precision.autocast(mode, device):
        task.sample(Path(run_dir), model, cfg, options)
    logger.info("wrote %d samples to %s", options.num, out)
    return out


@dataclass(frozen=True)
class Evaluated:
    """What `evaluate_run` wrote and found."""

    out: Path               # the directory: evaluation.json and the task's files (plots, samples)
    result: dict[str, Any]  # what evaluation.json holds
    summary: str            # the task's few readable lines of it (what the command prints)


def evaluate_run(run_dir: str | Path, options: EvaluateOptions | None = None, **values: Any) -> Evaluated:
    """Evaluates a trained run with its task's metrics, as `diffusionblocks evaluate` does.

    options: the run's task's evaluate options (`get_task(cfg.task).evaluate_options`, which extends
    EvaluateOptions); values: options by name instead, or in place of some of `options`' ("num", "seed"...).
    """
    precision.flush_denormals()
    cfg = read_config(run_dir)
    task = get_task(cfg.task)
    if not isinstance(task, EvaluatingTask):
        raise ConfigError(f"task {task.name!r} has no evaluation")
    options = _options(task.evaluate_options, options, values, f"evaluate options of task {cfg.task!r}")
    out = Path(options.out) if options.out else Path(run_dir) / task.evaluation_name(cfg, options)
    check_output_dir(out)
    if options.num < 1:
        raise ConfigError(f"--num must be at least 1, got {options.num}")
    if out.exists() and any(out.iterdir()) and not options.overwrite:
        raise ConfigError(f"{str(out)!r} already exists; pass --overwrite to replace it, or --out another directory")
    device = resolve_device(options.device)
    options = dataclasses.replace(options, device=str(device))
    mode = precision.resolve(options.precision, device)
    code = rundir.code_version()  # the code the evaluation starts with, not one checked out while it runs
    with precision.matmul_mode(mode), precision.autocast(mode, device):
        evaluation = task.evaluate(Path(run_dir), options)
    out.mkdir(parents=True, exist_ok=True)
    evaluation.result["code"] = code
    (out / "evaluation.json").write_text(json.dumps(evaluation.result, indent=2) + "\n")
    task.write_evaluation(out, cfg, evaluation)
    return Evaluated(out, evaluation.result, task.format_evaluation(evaluation.result))


# ---- status


def own_time(axis: Any, lo: float, hi: float) -> str:
    """", t 0.394-0.606": a range of the noise axis in the model's own time (its `warp`), for an axis that names one
    (rectified flow's t, DDPM's timesteps); "" for the others."""
    name = getattr(axis, "time_name", None)
    if name is None:
        return ""
    w_lo, w_hi = (float(axis.warp(torch.tensor(s))) for s in (lo, hi))
    return f", {name} {w_lo:.3g}-{w_hi:.3g}"


def run_status(run_dir: str | Path) -> str:
    """Which blocks of a run are trained, how far, and which are missing, in lines for the terminal.

    What each block's files say, read the way `resume` reads them: a block's training state says where it is,
    and a block copied from another run is judged by its source (checkpoint.progress). A damaged copy is refused
    (ConfigError) before any line.
    """
    run = Path(run_dir)
    cfg = read_config(run)
    total = cfg.train.steps_per_block
    B = cfg.blocks.num_blocks
    progress = [checkpoint.progress(run, b, cfg) for b in range(B)]
    lines = [f"{run}: {cfg.name}, B={B} blocks of {list(cfg.layer_split())} layers, "
             f"{total} steps per block, {cfg.train.schedule} schedule"]
    if pilot.needs_pilot(cfg):
        return "\n".join(lines + [f"  the balanced partition's pilot has not finished ({run / pilot.PILOT_DIR}): "
                                   f"--resume {run} trains it, fits the boundaries, then trains the blocks"])
    if cfg.blocks.partition == "balanced":
        lines.append(f"  {pilot.describe(run)}")
    done, missing, todo, stuck = [], [], [], []
    task = get_task(cfg.task)
    noise, partition = task.noise_symbol, task.partition(cfg)
    for b, p in enumerate(progress):
        lo, hi = partition.block_range(b)
        where = f"  block {b} ({noise} {lo:.3g}-{hi:.3g}{own_time(partition.axis, lo, hi)}):"
        lock = rundir.block_lock_path(run, b)
        busy = " (a job holds its lock: training now)" if lock.is_file() and rundir.lock_holder(run, b) else ""
        source = checkpoint.block_source(run, b)
        if p is None:
            if checkpoint.is_copy(source):
                missing.append(b)
                lines.append(f"{where} missing (a copy of block {b} of {source['run']} whose file is gone: copy it "
                             "again)")
            elif source is not None:  # `train --from` stopped before this block's first checkpoint
                todo.append(b)
                lines.append(f"{where} missing: to be fine-tuned from block {b} of {source['run']} (--resume does)"
                             f"{busy}")
            else:
                missing.append(b)
                lines.append(f"{where} missing{busy}")
            continue
        step, target, weights = p["step"], p["target"], p["weights_step"]
        of = " of its source" if p["copy"] else ""
        if step >= target:
            done.append(b)
            state = "trained"
        else:
            (stuck if p["copy"] else todo).append(b)
            state = f"partial, {100 * step / target:.0f}%"
        note = ""
        if p["copy"]:
            if step < target:
                note = (f"; its source stopped it there, and this run has no training state to continue it: continue "
                        f"it in its source and copy it again, or fine-tune it with train --from {run} --blocks {b}")
        elif weights is None:
            note = "; no weights file yet (--resume writes it from the training state)"
        elif weights != step:
            note = (f"; its weights are from step {weights}, a checkpoint cut short: --resume redoes steps "
                    f"{step + 1}-{weights}" if weights > step else
                    f"; its weights are from step {weights}: --resume rewrites them from the training state")
        elif not p["has_state"] and step < total:
            start = f"fine-tunes it again from block {b} of {source['run']}" if source is not None else \
                "trains it from the start"
            note = f"; no training state to continue from: --resume {start}"
        lines.append(f"{where} {state}, step {step}/{target}{of}, {p['train_time_s']:.0f} s of training{note}{busy}")
    if missing:
        ready = f"missing block(s) {missing}: train them with --blocks {','.join(map(str, missing))}"
    elif todo:
        ready = f"every block is present (the model can be sampled); continue block(s) {todo} with --resume {run}"
    elif stuck:
        ready = f"every block is present (the model can be sampled); block(s) {stuck} are copies left partly trained"
    else:
        ready = "every block is present: the model can be sampled"
    lines.append(f"  {len(done)}/{B} trained; {ready}")
    for row in checkpoint.read_composition(run) or []:
        how = {"kept": "kept from", "start": "fine-tuned from"}.get(row.get("role"), "composed from")
        if row.get("role") == "converted":
            first, last = row["layers"]
            how = f"converted ({row['init']}: layers {first}-{last - 1} of block {row['source_block']}) from"
        via = f", via {', '.join(row['via'])}" if row.get("via") else ""
        lines.append(f"  block {row['block']} {how} {row['run']} ({row['run_name']}, step {row['step']}{via})")
    return "\n".join(lines)
