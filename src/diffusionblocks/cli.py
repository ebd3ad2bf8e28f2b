"""The `diffusionblocks` command: train, sample, evaluate, compare, compose, status, bench memory and speed."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from . import checkpoint, precision
from .compose import compose_run, copy_block, parse_block_sources, source_record
from .config import PRECISIONS, ConfigError, RunConfig
from .memory import PeakMemory
from .tasks import apply_overrides, available, default_config, get_task, load_config

logger = logging.getLogger("diffusionblocks")

# Fields that may change when a run is resumed: how long and how it trains, how it samples; not what it is.
RESUMABLE_SECTIONS = ("train.steps_per_block", "train.log_every", "train.checkpoint_every", "sample.")
# A new run made --from a trained one may train differently (learning rate, seed...) and on other data (adapting
# a model to a new domain), not be another model.
FROM_SECTIONS = ("name", "train.", "sample.", "data.")


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device name (try cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def _resolve_train_config(args: argparse.Namespace) -> RunConfig:
    base = args.resume or args.from_
    if base is not None:
        if args.config is not None:
            raise ConfigError(f"--{'resume' if args.resume else 'from'} uses the run's own config.json; "
                              "do not pass --config too")
        if args.resume and args.out is not None and Path(args.out) != Path(args.resume):
            raise ConfigError(f"--resume continues {args.resume} in place; --out {args.out} would be ignored")
        cfg = checkpoint.read_config(base)
        allowed = (*RESUMABLE_SECTIONS, *get_task(cfg.task).resumable_fields) if args.resume else FROM_SECTIONS
        # An override that restates the run's own value (e.g. --schedule parallel on a parallel run) changes nothing.
        bad = [o for o in args.overrides if not o.split("=", 1)[0].startswith(allowed)
               and apply_overrides(cfg, [o]) != cfg]
        if bad:
            raise ConfigError(f"override {bad[0]!r} would change what the run {base} is; only "
                              f"{', '.join(allowed)} may change with --{'resume' if args.resume else 'from'}")
        cfg = apply_overrides(cfg, args.overrides)
    elif args.config is not None:
        cfg = apply_overrides(load_config(args.config), args.overrides)
    else:
        cfg = apply_overrides(default_config(), args.overrides)
    return cfg


def _parse_blocks(text: str | None, B: int) -> list[int]:
    """--blocks "1,3" -> [1, 3]; None -> every block."""
    if text is None:
        return list(range(B))
    try:
        blocks = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise ConfigError(f"--blocks {text!r} is not a comma-separated list of block indices") from None
    bad = [b for b in blocks if not 0 <= b < B]
    if bad or not blocks:
        raise ConfigError(f"--blocks {text!r}: the model has blocks 0..{B - 1}")
    return blocks


def _writable_place(path: Path, what: str) -> None:
    """Refuses a path that cannot be created: a file where a directory must be, or a directory not writable."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is a file")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is not writable")
            return


def _check_output_file(path: Path, flag: str = "--out") -> None:
    if path.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a directory; give a file name")
    _writable_place(path, flag)


def _check_output_dir(path: Path, flag: str = "--out") -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a file, not a directory")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {str(path)!r} is not writable")
    _writable_place(path, flag)


def _has_block_files(run_dir: Path) -> bool:
    return any(run_dir.glob("block_*.safetensors")) or any(run_dir.glob("block_*.state.pt"))


def _new_run_dir(args: argparse.Namespace, name: str) -> tuple[Path, bool]:
    """The directory of a new run, and whether this command created it.

    --out may name a directory that does not exist, an empty one, a run that never trained (its
    config.json and nothing of any block: a run stopped before its first checkpoint is started again), or
    one holding only what a killed command left (locks nobody holds, temporaries of ended processes).
    """
    if args.out is None:
        _check_output_dir(Path(args.runs_root), "--runs-root")
        return checkpoint.new_run_dir(args.runs_root, name), True
    run_dir = Path(args.out)
    _check_output_dir(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        if checkpoint.leftovers_only(run_dir):
            logger.info("%s holds only what a killed command left: starting the run in it", run_dir)
            checkpoint.clear_leftovers(run_dir)
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
    src_cfg = checkpoint.read_config(src)
    keep = [b for b in range(B) if b not in blocks]
    rows = []
    for b in keep:
        if checkpoint.block_weights_path(src, b).is_file():
            rows.append(copy_block(src, b, src_cfg, dst, "kept"))
        if checkpoint.block_state_path(src, b).is_file():
            shutil.copy2(checkpoint.block_state_path(src, b), checkpoint.block_state_path(dst, b))
    if not reinit:  # what --resume starts them from again if this run is stopped before their first checkpoint
        rows += [{**source_record(src, b, src_cfg, carry=False), "role": "start"} for b in blocks]
    if rows:
        checkpoint.save_composition(dst, rows)
    if (src / "metrics.jsonl").is_file():
        lines = [line for line in (src / "metrics.jsonl").read_text().splitlines()
                 if line.strip() and json.loads(line).get("block") in keep]
        (dst / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def _blocks_to_resume(run_dir: Path, cfg: RunConfig, blocks: list[int],
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
    from .train import init_block_state

    total, todo, starts, partial = cfg.train.steps_per_block, [], {}, []
    for b in blocks:
        path = checkpoint.block_weights_path(run_dir, b)
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
                if not checkpoint.block_weights_path(start, b).is_file():
                    raise ConfigError(f"block {b} is fine-tuned from block {b} of {str(start)!r}, whose weights are "
                                      f"gone: start the fine-tuning again with train --from RUN --blocks {b}")
                checkpoint.check_recorded_sha256(checkpoint.block_weights_path(start, b), source,
                                                 f"block {b} of {str(run_dir)!r} was to be fine-tuned from it")
                starts[b] = start
            if info is not None:
                logger.info("block %d: its weights (step %d) have no training state to continue from: training it "
                            "from the start%s", b, info["step"], f" (the weights of {starts[b]})" if b in starts else "")
        elif step > total:
            raise ConfigError(f"train.steps_per_block={total} is below the {step} steps block {b} has trained; "
                              "a block cannot be made to have trained less")
        init_block_state(get_task(cfg.task), cfg, b, torch.device("cpu"), run_dir, starts)  # raises on a corrupt or mismatched state
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


class _Prepared:
    """What _prepare_run_dir decided: where to train, which blocks, from which run, and the locks it holds."""

    def __init__(self, run_dir: Path, blocks: list[int], init_from: Path | dict[int, Path] | None, claims,
                 created: bool):
        self.run_dir, self.blocks, self.init_from, self.claims, self.created = run_dir, blocks, init_from, claims, created


def _prepare_run_dir(args: argparse.Namespace, cfg: RunConfig, blocks: list[int]) -> _Prepared:
    """The run directory to train into (created or checked, config written), with the blocks to train claimed."""
    B = cfg.blocks.num_blocks
    if args.resume is not None:
        run_dir = Path(args.resume)
        claims = _claim(run_dir, blocks)
        try:
            todo, starts = _blocks_to_resume(run_dir, cfg, blocks, named=args.blocks is not None)
            checkpoint.save_config(run_dir, cfg)
        except BaseException:
            claims.release()
            raise
        return _Prepared(run_dir, todo, starts or None, claims, False)
    if args.from_ is not None:
        src = Path(args.from_)
        for b in range(B):
            checkpoint.block_step(src, b)  # raises on a corrupt weights file
        missing = [b for b in blocks if checkpoint.block_step(src, b) is None]
        if missing and not args.reinit:
            raise ConfigError(f"--from {src}: block(s) {missing} have no weights to fine-tune; pass --reinit to "
                              "train them from scratch")
        for b in range(B):
            if checkpoint.block_weights_path(src, b).is_file():
                checkpoint.check_block_metadata(checkpoint.block_weights_path(src, b), b, cfg)
                checkpoint.copied_block(src, b)  # a copied block must still be the bytes recorded
        run_dir, created = _new_run_dir(args, f"{cfg.name}-B{B}-{'retrain' if args.reinit else 'finetune'}"
                                              f"-b{'-'.join(map(str, blocks))}")
        prepared = _Prepared(run_dir, blocks, None if args.reinit else src, _claim(run_dir, range(B)), created)
        with _undo_on_failure(prepared, B):
            _copy_untouched_blocks(src, run_dir, blocks, B, args.reinit)
            checkpoint.save_config(run_dir, cfg)
        return prepared
    if args.blocks is not None and args.out is not None:
        # An independent job of a block-wise run (a Slurm array task): make or join the shared run directory.
        run_dir = Path(args.out)
        _check_output_dir(run_dir)
        try:
            run_dir.mkdir(parents=True)
            created = True
        except FileExistsError:
            created = False
        checkpoint.join_run(run_dir, cfg)
        claims = _claim(run_dir, blocks)
        taken = [b for b in blocks if checkpoint.block_step(run_dir, b) is not None
                 or checkpoint.block_state_path(run_dir, b).exists()]
        if taken:
            claims.release()
            raise ConfigError(f"block(s) {taken} of {str(run_dir)!r} already have checkpoints; continue them with "
                              f"--resume {run_dir} --blocks {','.join(map(str, taken))}")
        return _Prepared(run_dir, blocks, None, claims, created)
    run_dir, created = _new_run_dir(args, f"{cfg.name}-B{B}")
    # The blocks are claimed before the config is written: a job already training in it keeps its own.
    prepared = _Prepared(run_dir, blocks, None, _claim(run_dir, range(B)), created)
    with _undo_on_failure(prepared, B):
        checkpoint.save_config(run_dir, cfg)
    return prepared


@contextlib.contextmanager
def _undo_on_failure(prepared: _Prepared, B: int):
    try:
        yield
    except BaseException:
        _discard_untrained(prepared, B)
        prepared.claims.release()
        raise


def _claim(run_dir: Path, blocks) -> checkpoint.BlockClaims:
    """Locks the blocks for this job, or raises ConfigError naming the job that holds one (and holds none)."""
    claims = checkpoint.BlockClaims(run_dir)
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
    if not prepared.created or not run_dir.is_dir() or _has_block_files(run_dir):
        return
    try:
        for b in range(B):
            prepared.claims.claim(b)
    except (ConfigError, OSError):
        return
    prepared.claims.release()
    shutil.rmtree(run_dir, ignore_errors=True)


def _data_run(args: argparse.Namespace) -> Path | None:
    """The run whose files (a vocabulary) the training data is read through: the run fine-tuned from, or the run
    resumed or joined (`--blocks` into `--out`) once it has a block's files; None: the data makes its own."""
    if args.from_ is not None:
        return Path(args.from_)
    run = args.resume if args.resume is not None else args.out if args.blocks is not None else None
    return Path(run) if run is not None and Path(run).is_dir() and _has_block_files(Path(run)) else None


def cmd_train(args: argparse.Namespace) -> None:
    from . import distributed
    from .train import train

    t_start = time.perf_counter()
    # Everything that can be wrong is checked before any training time is spent.
    if args.resume and args.from_:
        raise ConfigError("--resume continues a run in place and --from starts a new one from it: pass one of them")
    if args.reinit and not args.from_:
        raise ConfigError("--reinit needs --from RUN (it retrains chosen blocks of RUN from scratch)")
    if args.schedule is not None:
        args.overrides = [*args.overrides, f"train.schedule={args.schedule}"]
    if args.task is not None:  # first, so that the other overrides apply to that task's config
        args.overrides = [f"task={args.task}", *args.overrides]
    cfg = _resolve_train_config(args)
    B = cfg.blocks.num_blocks
    blocks = _parse_blocks(args.blocks, B)
    device = _device(args.device)
    precision.resolve(cfg.train.precision, device)  # e.g. tf32 on a CPU: refused now
    if distributed.launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if cfg.train.schedule != "parallel":
            raise ConfigError(f"launched on {world} ranks by torchrun: use --schedule parallel "
                              f"(train.schedule is {cfg.train.schedule!r})")
        for r in range(world):
            k = distributed.assign(r, world, blocks).shard[1]
            if cfg.train.batch_size % k:
                raise ConfigError(f"train.batch_size={cfg.train.batch_size} does not split evenly over the {k} "
                                  f"data-parallel ranks of a block ({world} ranks for {len(blocks)} block(s))")
    task = get_task(cfg.task)
    source = _data_run(args)
    data = task.load_run_data(cfg, source) if source is not None else task.load_data(cfg)  # raises when it does
    task.check_after_training(cfg, data)  # not fit the model, or what the finished run does with it cannot be done
    rank, world, device = distributed.init(device)
    prepared = None
    try:
        # Rank 0 makes or checks the run directory; every rank learns its path, or the error, from it.
        if rank == 0:
            try:
                prepared = _prepare_run_dir(args, cfg, blocks)
                found: tuple | str = (prepared.run_dir, prepared.blocks, prepared.init_from)
            except ConfigError as e:
                found = str(e)
        found = distributed.broadcast_object(found if rank == 0 else None)
        if isinstance(found, str):
            raise ConfigError(found)
        run_dir, todo, init_from = found
        args.run_dir = run_dir
        if rank == 0:
            task.prepare_run(cfg, run_dir, data)
            logger.info("run directory: %s", run_dir)
            logger.info("task %s: %s training / %s held-out examples; B=%d blocks of %s layers, training block(s) "
                        "%s, %s schedule, %d steps per block, device %s%s", cfg.task, _size(data.train),
                        _size(data.test), B, list(cfg.layer_split()), todo, cfg.train.schedule,
                        cfg.train.steps_per_block, device, _starting_from(init_from))
        with PeakMemory(device) as mem:
            train(task, cfg, data.train, run_dir, device=device, blocks=todo, progress=not args.no_progress,
                  init_from=init_from, claim=False)
        distributed.barrier()
        if rank == 0:
            _finish_run(cfg, run_dir, blocks, mem, device, t_start)
    except (ConfigError, OSError):
        if prepared is not None:
            _discard_untrained(prepared, B)
        raise
    finally:
        if prepared is not None:
            prepared.claims.release()
        distributed.shutdown()


def _starting_from(init_from: Path | dict[int, Path] | None) -> str:
    if isinstance(init_from, dict):
        return "".join(f", block {b} starting from {run}'s" for b, run in sorted(init_from.items()))
    return f", starting from {init_from}" if init_from else ""


def _size(split) -> str:
    try:
        return str(len(split))
    except TypeError:  # a stream without a length
        return "?"


def _finish_run(cfg: RunConfig, run_dir: Path, blocks: list[int], mem: PeakMemory, device: torch.device,
                t_start: float) -> None:
    """train_summary.json, loss.png and, once every block is trained, what the task shows (samples, evaluation)."""
    from .plotting import plot_losses

    B = cfg.blocks.num_blocks
    infos = [checkpoint.block_info(run_dir, b) for b in range(B)]
    summary = {"blocks": [{**i, "steps_per_s": i["step"] / i["train_time_s"] if i["train_time_s"] > 0 else None}
                          for i in infos if i is not None],
               "trained_now": blocks, "schedule": cfg.train.schedule,
               "world_size": int(os.environ.get("WORLD_SIZE", "1")), "peak_train_memory_bytes": mem.peak_bytes,
               "memory_measure": mem.kind + (" (rank 0)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""),
               "device": str(device)}
    for row in summary["blocks"]:
        row["steps"] = row.pop("step")
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png", B, title=f"{cfg.name}, B={B}")
    missing = [b for b, i in enumerate(infos) if i is None]
    if missing:
        logger.info("blocks %s are not trained yet: nothing to sample or evaluate until every block is", missing)
    else:
        summary.update(get_task(cfg.task).after_training(cfg, run_dir, device))
    summary["wall_time_s"] = time.perf_counter() - t_start
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for row in summary["blocks"]:
        logger.info("block %d: %d steps in %.1f s (%.1f steps/s)", row["block"], row["steps"], row["train_time_s"],
                    row["steps_per_s"] or 0.0)
    logger.info("wrote %s (loss.png, metrics.jsonl, train_summary.json) in %.1f s", run_dir, summary["wall_time_s"])


def cmd_sample(args: argparse.Namespace) -> None:
    cfg = checkpoint.read_config(args.run)
    task = get_task(cfg.task)
    args.progress = not args.no_progress
    out = Path(args.out)
    if not task.sample_suffixes:
        raise ConfigError(f"{args.run} is a {cfg.task!r} run: it has nothing to sample; use "
                          f"`diffusionblocks evaluate {args.run}`")
    if out.suffix.lower() not in task.sample_suffixes:
        raise ConfigError(f"--out {args.out!r} must end in {' or '.join(task.sample_suffixes)}")
    _check_output_file(out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"--out {args.out!r} already exists; pass --overwrite to replace it")
    if args.num < 1:
        raise ConfigError(f"--num must be at least 1, got {args.num}")
    args.device = _device(args.device)
    mode = precision.resolve(args.precision, args.device)
    model, cfg = checkpoint.from_pretrained(args.run, args.device, stream=args.stream)
    out.parent.mkdir(parents=True, exist_ok=True)
    with precision.matmul_mode(mode), precision.autocast(mode, args.device):
        task.sample(model, cfg, args)
    logger.info("wrote %d samples to %s", args.num, out)


def cmd_evaluate(args: argparse.Namespace) -> None:
    cfg = checkpoint.read_config(args.run)
    task = get_task(cfg.task)
    args.progress = not args.no_progress
    out = Path(args.out) if args.out else Path(args.run) / task.evaluation_name(cfg, args)
    _check_output_dir(out)
    if args.num < 1:
        raise ConfigError(f"--num must be at least 1, got {args.num}")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"{str(out)!r} already exists; pass --overwrite to replace it, or --out another directory")
    args.device = _device(args.device)
    mode = precision.resolve(args.precision, args.device)
    with precision.matmul_mode(mode), precision.autocast(mode, args.device):
        evaluation = task.evaluate(Path(args.run), args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(evaluation.result, indent=2) + "\n")
    task.write_evaluation(out, cfg, evaluation)
    print(task.format_evaluation(evaluation.result))
    logger.info("wrote %s", out)


def cmd_compare(args: argparse.Namespace) -> None:
    from .compare import comparison_configs, prepare_out_dir, run_comparison

    try:
        num_blocks = [int(b) for b in args.num_blocks.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--num-blocks {args.num_blocks!r} is not a comma-separated list of integers") from None
    if args.resume and args.out and (Path(args.out) / "config.json").is_file():
        if args.config or args.overrides:
            raise ConfigError("--resume continues a comparison with its own config.json; do not pass --config or overrides")
        cfg = checkpoint.read_config(args.out)
    else:
        cfg = load_config(args.config) if args.config is not None else default_config()
        cfg = apply_overrides(cfg, args.overrides)
    comparison_configs(cfg, num_blocks)  # every config is checked before anything runs
    task = get_task(cfg.task)
    task.check_after_training(cfg, task.load_data(cfg))  # and the data, against the model and what runs after
    out = prepare_out_dir(args.out, args.runs_root, cfg.name, args.resume)
    logger.info("comparison directory: %s", out)
    run_comparison(cfg, out, num_blocks=num_blocks, num_samples=args.num, seed=args.seed, device=args.device,
                   cache_dir=args.cache_dir, progress=not args.no_progress)
    print((out / "report.md").read_text().split("\n## ")[0])
    logger.info("wrote %s/report.md", out)


def cmd_compose(args: argparse.Namespace) -> None:
    sources = parse_block_sources(args.block)
    out = Path(args.out)
    _check_output_dir(out)
    cfg = compose_run(sources, out, args.overrides)
    for b, run in sorted(sources.items()):
        logger.info("block %d: from %s", b, run)
    logger.info("wrote %s (%s, B=%d): sample, evaluate and status work on it like on any run", out, cfg.name,
                cfg.blocks.num_blocks)


def cmd_status(args: argparse.Namespace) -> None:
    """What each block's files say, read the way --resume reads them: a block's training state says where it is,
    and a block copied from another run is judged by its source (checkpoint.progress)."""
    run = Path(args.run)
    cfg = checkpoint.read_config(run)
    total = cfg.train.steps_per_block
    B = cfg.blocks.num_blocks
    progress = [checkpoint.progress(run, b, cfg) for b in range(B)]  # a damaged copy is refused before any line
    print(f"{run}: {cfg.name}, B={B} blocks of {list(cfg.layer_split())} layers, "
          f"{total} steps per block, {cfg.train.schedule} schedule")
    done, missing, todo, stuck = [], [], [], []
    task = get_task(cfg.task)
    partition = task.partition(cfg)
    for b, p in enumerate(progress):
        lo, hi = partition.block_range(b)
        where = f"  block {b} ({task.noise_symbol} {lo:.3g}-{hi:.3g}):"
        lock = checkpoint.block_lock_path(run, b)
        busy = " (a job holds its lock: training now)" if lock.is_file() and checkpoint.lock_holder(run, b) else ""
        source = checkpoint.block_source(run, b)
        if p is None:
            if checkpoint.is_copy(source):
                missing.append(b)
                print(f"{where} missing (a copy of block {b} of {source['run']} whose file is gone: copy it again)")
            elif source is not None:  # `train --from` stopped before this block's first checkpoint
                todo.append(b)
                print(f"{where} missing: to be fine-tuned from block {b} of {source['run']} (--resume does){busy}")
            else:
                missing.append(b)
                print(f"{where} missing{busy}")
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
        print(f"{where} {state}, step {step}/{target}{of}, {p['train_time_s']:.0f} s of training{note}{busy}")
    if missing:
        ready = f"missing block(s) {missing}: train them with --blocks {','.join(map(str, missing))}"
    elif todo:
        ready = f"every block is present (the model can be sampled); continue block(s) {todo} with --resume {run}"
    elif stuck:
        ready = f"every block is present (the model can be sampled); block(s) {stuck} are copies left partly trained"
    else:
        ready = "every block is present: the model can be sampled"
    print(f"  {len(done)}/{B} trained; {ready}")
    for row in checkpoint.read_composition(run) or []:
        how = {"kept": "kept from", "start": "fine-tuned from"}.get(row.get("role"), "composed from")
        via = f", via {', '.join(row['via'])}" if row.get("via") else ""
        print(f"  block {row['block']} {how} {row['run']} ({row['run_name']}, step {row['step']}{via})")


def cmd_bench_memory(args: argparse.Namespace) -> None:
    from .membench import child_main, run_benchmark

    if args.child is not None:
        child_main(args.child)
        return
    try:
        num_blocks = [int(b) for b in args.num_blocks.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--num-blocks {args.num_blocks!r} is not a comma-separated list of integers") from None
    device = str(_device(args.device))
    out = _bench_out(args)
    base, title = _bench_config(args)
    measures = tuple(m.strip() for m in args.cpu_measure.split(",") if m.strip())
    run_benchmark(base, args.config is None, args.steps, num_blocks, device, out, title, measures)


def _bench_out(args: argparse.Namespace) -> Path | None:
    """A benchmark's --out: a new or empty directory."""
    if not args.out:
        return None
    out = Path(args.out)
    _check_output_dir(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {args.out!r} already exists and is not empty; choose another directory")
    return out


def _bench_config(args: argparse.Namespace) -> tuple[RunConfig, str]:
    """What a benchmark measures: --config, or a DiT of --model size on random images, with the overrides; and its
    title."""
    from .membench import model_config

    if args.config is not None:
        base = apply_overrides(load_config(args.config), args.overrides)
        return base, f"{base.name} ({base.task}), batch {base.train.batch_size}"
    base = apply_overrides(model_config(args.model, args.image_size, args.channels, args.batch), args.overrides)
    extra = f" ({' '.join(args.overrides)})" if args.overrides else ""
    return base, f"{args.model} at {args.image_size}x{args.image_size}, batch {args.batch}{extra}"


def cmd_bench_speed(args: argparse.Namespace) -> None:
    from .speedbench import parse_modes, run_speed_benchmark

    device = _device(args.device)
    precisions, compiles = parse_modes(args.precisions, args.compile)
    if device.type != "cuda" and "tf32" in precisions:
        precisions = [p for p in precisions if p != "tf32"]
        logger.info("tf32 is a CUDA mode: measuring %s on %s", ", ".join(precisions), device.type)
    for name in ("steps", "windows", "num_blocks"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    out = _bench_out(args)
    base, title = _bench_config(args)
    if args.num_blocks > base.model.depth:
        raise ConfigError(f"--num-blocks {args.num_blocks} is more than the model's {base.model.depth} layers")
    run_speed_benchmark(base, args.config is None, args.num_blocks, precisions, compiles, device, args.steps,
                        args.warmup, args.windows, out, title)


def _task_options_help(kind: str) -> str:
    """The options each built-in task adds to `sample` or `evaluate`, for the verb's --help."""
    lines = ["options of the run's task (with RUN given, --help lists them in full):"]
    for name in available():
        parser = argparse.ArgumentParser(prog="", add_help=False)
        try:
            getattr(get_task(name), f"add_{kind}_arguments")(parser)
        except (ConfigError, ImportError) as e:  # a broken task must not break the other commands
            lines.append(f"  {name}: unavailable ({e})")
            continue
        usage = parser.format_usage().replace("usage:", "").strip() or "(none)"
        lines.append(f"  {name}: {usage}")
    return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the epilog's lines kept as written."""


def build_parser(run_task=None) -> argparse.ArgumentParser:
    """The command's parser; run_task: the task of the run that `sample` or `evaluate` was given, whose
    options those verbs then take."""
    parser = argparse.ArgumentParser(prog="diffusionblocks", description="DiffusionBlocks: train a network block by "
                                     "block as chained diffusion denoisers, and sample from it.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (no arguments: class-conditional DiT on the 8x8 digits, B=3)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="override single config fields, e.g. blocks.num_blocks=2 train.lr=3e-4")
    p.add_argument("--config", help="JSON config file (see presets/); missing fields take the defaults")
    p.add_argument("--out", help="run directory to create (must not exist or be empty)")
    p.add_argument("--runs-root", default="runs", help="where a new numbered run directory goes when --out is not given")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last checkpoint")
    p.add_argument("--blocks", help="train only these blocks, e.g. 1 or 0,2 (default: all)")
    p.add_argument("--from", dest="from_", metavar="RUN", help="new run from a trained RUN: fine-tune --blocks from "
                   "RUN's weights (or retrain them with --reinit); the other blocks' files are copied unchanged")
    p.add_argument("--reinit", action="store_true", help="with --from: train the chosen blocks from scratch")
    p.add_argument("--task", help=f"the task ({', '.join(available())}, or package.module:TaskClass); with no "
                   "--config, start from its default config (classify: a ViT label denoiser on the digits); shortcut for "
                   "task=NAME")
    p.add_argument("--schedule", choices=["sequential", "interleaved", "parallel"],
                   help="shortcut for train.schedule=...; parallel: launch with torchrun, one group of ranks per block")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw samples from a trained run", epilog=_task_options_help("sample"),
                       formatter_class=_HelpFormatter)
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--num", type=int, default=100, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="sample i uses the noise of seed (seed, i)")
    p.add_argument("--device", help="cpu, cuda... (default: cuda if available)")
    p.add_argument("--out", required=True, help="output file; its kind is the task's (image generation: .png grid, "
                   "or .npz with images (N,C,H,W in [-1,1]) and labels)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="arithmetic of the network: auto is bf16 "
                   "autocast on CUDA, fp32 elsewhere; tf32 is CUDA's TF32 matmuls")
    p.add_argument("--stream", action="store_true", help="keep one block in memory at a time (models larger than "
                   "the device): each block is loaded from disk when the sampler reaches its noise levels")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if run_task is not None:
        run_task.add_sample_arguments(p.add_argument_group(f"options of {run_task.name!r} runs"))
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="the task's metrics of a trained run (images: conditional accuracy, FD, KID, "
                       "chain diagnostics; classifiers: accuracy along the chain)", epilog=_task_options_help("evaluate"),
                       formatter_class=_HelpFormatter)
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--num", type=int, default=1000, help="number of samples the metrics use (where the task samples)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and the evaluation's random subsets")
    p.add_argument("--out", help="output directory (default: RUN/eval-<settings>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--cache-dir", help="reference classifier cache (default: $DIFFUSIONBLOCKS_CACHE or "
                   "~/.cache/diffusionblocks)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="arithmetic of the networks (the run's and "
                   "the reference classifier): auto is bf16 autocast on CUDA, fp32 elsewhere")
    p.add_argument("--device", help="cpu, cuda... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if run_task is not None:
        run_task.add_evaluate_arguments(p.add_argument_group(f"options of {run_task.name!r} runs"))
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="end-to-end (B=1) vs DiffusionBlocks at several B, equal compute, one report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides for every run")
    p.add_argument("--config", help="JSON config file (see presets/)")
    p.add_argument("--num-blocks", default="2,3,4", help="values of B to compare with B=1")
    p.add_argument("--num", type=int, default=1000, help="samples per run for the metrics")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (the same for every run)")
    p.add_argument("--out", help="report directory (default: a new numbered directory under --runs-root)")
    p.add_argument("--runs-root", default="runs", help="where a new report directory goes")
    p.add_argument("--resume", action="store_true", help="continue the comparison in --out: train what is missing")
    p.add_argument("--cache-dir", help="reference classifier cache")
    p.add_argument("--device", help="cpu, cuda... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("compose", help="a new run whose blocks are copied from other runs (blocks trained apart, "
                       "e.g. on other data, chained as one model)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="name=..., data.* (what it is "
                   "evaluated on) or sample.* of the new run; the rest is the config of block 0's source")
    p.add_argument("--block", action="append", required=True, metavar="INDEX=RUN", help="take block INDEX (or "
                   "INDEX,INDEX...) from RUN; repeat for every block, e.g. --block 0=runs/a --block 1,2=runs/b")
    p.add_argument("--out", required=True, help="the new run directory (must not exist, or be empty)")
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser("status", help="which blocks of a run are trained, how far, and which are missing")
    p.add_argument("run", metavar="RUN", help="run directory")
    p.set_defaults(func=cmd_status)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser(
        "memory", help="peak training memory and step time: end-to-end vs DiffusionBlocks, each in a fresh process",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides (of --config, or of the --model config)")
    p.add_argument("--config", help="measure this config (any task, on its own data) instead of --model")
    p.add_argument("--model", default="dit-s2", help="dit-s2 (12 layers, hidden 384), dit-b2 (12, 768) or tiny, "
                   "class-conditional DiTs on random images")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="images per step (--model)")
    p.add_argument("--steps", type=int, default=3, help="steps per block (timings are medians after the first)")
    p.add_argument("--num-blocks", default="2,3,4,6", help="values of B")
    p.add_argument("--device", help="cpu, cuda... (default: cuda if available)")
    p.add_argument("--cpu-measure", default="rss,allocated", help="on the CPU: rss (peak resident set size), "
                   "allocated (peak bytes held by PyTorch's CPU allocator, as CUDA counts), or both; each in its own "
                   "fresh process, the first giving the step times")
    p.add_argument("--out", help="directory for memory.md, memory.json, memory.png")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench_memory)

    p = bench.add_parser("speed", help="training throughput, end to end and per block, for each precision and compile "
                         "mode: the training loop's step next to the bare forward/backward/AdamW step",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides (of --config, or of the --model config)")
    p.add_argument("--config", help="measure this config (any task, on its own data) instead of --model")
    p.add_argument("--model", default="dit-s2", help="dit-s2, dit-b2 or tiny, class-conditional DiTs on random images")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=128, help="images per step (--model)")
    p.add_argument("--num-blocks", type=int, default=4, help="B of the block-wise model measured next to B=1")
    p.add_argument("--precisions", default="fp32,tf32,bf16", help="comma-separated; tf32 is left out off CUDA")
    p.add_argument("--compile", default="off,on", help="comma-separated modes: off, on")
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--windows", type=int, default=3, help="timed windows (the median is reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compiling happens here)")
    p.add_argument("--device", help="cpu, cuda... (default: cuda if available)")
    p.add_argument("--out", help="directory for speed.md and speed.json")
    p.set_defaults(func=cmd_bench_speed)
    for p in (*sub.choices.values(), *bench.choices.values()):
        p.add_argument("--traceback", action="store_true", help="on an error, print its traceback before the "
                       "one-line message (for a bug report, or a task module of yours that fails to import)")
    return parser


def _run_task(argv: list[str]):
    """For `sample RUN ...` and `evaluate RUN ...`: the task of RUN (the first argument that is a run directory),
    so that the parser knows its options wherever they stand; None otherwise."""
    if not argv or argv[0] not in ("sample", "evaluate"):
        return None
    run = next((a for a in argv[1:] if not a.startswith("-") and (Path(a) / "config.json").is_file()), None)
    return get_task(checkpoint.read_config(run).task) if run is not None else None


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, torchrun stopping the other ranks): handled as Ctrl-C is."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parses argv; `section.field=value` overrides may stand anywhere among the options, not only in one group."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.parse_args(argv)  # argparse's own message for what it does not know, exit 2
    return args


def _report(command: str, e: ConfigError, show_traceback: bool, hint: str = "") -> None:
    """The error's one line; with --traceback, the traceback of what caused it first."""
    if show_traceback:
        traceback.print_exception(e)
    elif e.__cause__ is not None:  # it wraps an error of other code (a task module that fails to import)
        hint += " (--traceback prints its traceback)"
    print(f"diffusionblocks {command}: error: {e}{hint}", file=sys.stderr)


def _discard_stdout() -> None:
    """Points stdout at the null device, so that flushing what is left at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # a stdout with no file descriptor (captured): nothing to point elsewhere
        pass


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run_task = _run_task(argv)
    except ConfigError as e:
        _report(argv[0], e, "--traceback" in argv)
        return 2
    args = _parse(build_parser(run_task), argv)
    # Denormal floats are slow on x86 CPUs, and the blocks of the lowest noise levels produce them (a
    # classifier's nearly saturated cross-entropy at sigma ~ 0.002, scaled by c_out ~ sigma): the last
    # digits-ViT block trained at 3.1 steps/s instead of 14.9. Flush them to zero, now, before torch
    # starts the worker threads that inherit the setting.
    torch.set_flush_denormal(True)
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args.func(args)
        sys.stdout.flush()  # now, so that a reader gone away is seen here rather than at exit
    except ConfigError as e:
        run_dir = getattr(args, "run_dir", None)
        hint = f"; once it can be written, continue with `diffusionblocks train --resume {run_dir}`" \
            if isinstance(e, checkpoint.CheckpointWriteError) and run_dir is not None and Path(run_dir).is_dir() else ""
        _report(args.command, e, args.traceback, hint)
        return 2
    except BrokenPipeError:  # the reader of the output has gone (`status RUN | head`): stop quietly, as `cat` does
        _discard_stdout()
        return 128 + signal.SIGPIPE if hasattr(signal, "SIGPIPE") else 1
    except OSError as e:  # the file system said no: a full disk, no permission, a file where a directory must be
        where = f"{e.filename!r}: " if e.filename else ""
        if args.traceback:
            traceback.print_exception(e)
        print(f"diffusionblocks {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        run_dir = getattr(args, "run_dir", None)
        hint = f"; continue with `diffusionblocks train --resume {run_dir}`" if run_dir is not None else ""
        print(f"{what}{hint}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
