"""The `diffusionblocks` command: train, sample, evaluate, compare, status, bench memory."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .config import ConfigError, RunConfig, apply_overrides, load_config
from .memory import PeakMemory

logger = logging.getLogger("diffusionblocks")

# Fields that may change when a run is resumed: how long and how it trains, how it samples; not what it is.
RESUMABLE_SECTIONS = ("train.steps_per_block", "train.log_every", "train.checkpoint_every", "sample.")
# A new run made --from a trained one may also train differently (learning rate, seed...), not be another model.
FROM_SECTIONS = ("train.", "sample.")


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


def _check_data_matches(cfg: RunConfig, data) -> None:
    m = cfg.model
    C, H = data.train.num_channels, data.train.image_size
    if (C, H) != (m.in_channels, m.image_size):
        raise ConfigError(f"data.dataset={cfg.data.dataset!r} has {C}-channel {H}x{H} images but the model expects "
                          f"model.in_channels={m.in_channels}, model.image_size={m.image_size}")
    if m.num_classes not in ((0, data.train.num_classes) if cfg.task == "generate" else (data.train.num_classes,)):
        raise ConfigError(f"data.dataset={cfg.data.dataset!r} has {data.train.num_classes} classes "
                          f"but model.num_classes={m.num_classes}")


def _resolve_train_config(args: argparse.Namespace) -> RunConfig:
    base = args.resume or args.from_
    if base is not None:
        if args.config is not None:
            raise ConfigError(f"--{'resume' if args.resume else 'from'} uses the run's own config.json; "
                              "do not pass --config too")
        cfg = checkpoint.read_config(base)
        allowed = RESUMABLE_SECTIONS if args.resume else FROM_SECTIONS
        bad = [o for o in args.overrides if not o.split("=", 1)[0].startswith(allowed)]
        if bad:
            raise ConfigError(f"override {bad[0]!r} would change what the run {base} is; only "
                              f"{', '.join(allowed)} may change with --{'resume' if args.resume else 'from'}")
        return apply_overrides(cfg, args.overrides)
    cfg = load_config(args.config) if args.config is not None else RunConfig()
    return apply_overrides(cfg, args.overrides)


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


def _new_run_dir(args: argparse.Namespace, name: str) -> Path:
    if args.out is None:
        return checkpoint.new_run_dir(args.runs_root, name)
    run_dir = Path(args.out)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {str(run_dir)!r} already exists and is not empty; "
                          f"use --resume {run_dir} to continue it, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _copy_untouched_blocks(src: Path, dst: Path, blocks: list[int], B: int) -> None:
    """Copies the weights, states and metrics of the blocks not being retrained, byte for byte."""
    keep = [b for b in range(B) if b not in blocks]
    for b in keep:
        for path in (checkpoint.block_weights_path(src, b), checkpoint.block_state_path(src, b)):
            if path.is_file():
                shutil.copy2(path, dst / path.name)
    if (src / "metrics.jsonl").is_file():
        lines = [line for line in (src / "metrics.jsonl").read_text().splitlines()
                 if line.strip() and json.loads(line).get("block") in keep]
        (dst / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def _prepare_run_dir(args: argparse.Namespace, cfg: RunConfig, blocks: list[int]) -> tuple[Path, Path | None]:
    """The run directory to train into (created or checked, config written) and the run to start from."""
    from .train import init_block_state

    B = cfg.blocks.num_blocks
    if args.resume is not None:
        run_dir = Path(args.resume)
        for b in blocks:
            checkpoint.block_step(run_dir, b)  # raises on a corrupt weights file
            init_block_state(cfg, b, torch.device("cpu"), run_dir)  # raises on a corrupt or mismatched state
        checkpoint.save_config(run_dir, cfg)
        return run_dir, None
    if args.from_ is not None:
        src = Path(args.from_)
        for b in range(B):
            checkpoint.block_step(src, b)  # raises on a corrupt weights file
        missing = [b for b in blocks if checkpoint.block_step(src, b) is None]
        if missing and not args.reinit:
            raise ConfigError(f"--from {src}: block(s) {missing} have no weights to fine-tune; pass --reinit to "
                              "train them from scratch")
        run_dir = _new_run_dir(args, f"{cfg.name}-B{B}-{'retrain' if args.reinit else 'finetune'}"
                                     f"-b{'-'.join(map(str, blocks))}")
        _copy_untouched_blocks(src, run_dir, blocks, B)
        checkpoint.save_config(run_dir, cfg)
        return run_dir, None if args.reinit else src
    if args.blocks is not None and args.out is not None and Path(args.out).exists():
        # An independent job of a block-wise run (a Slurm array task): join the shared run directory.
        run_dir = Path(args.out)
        checkpoint.join_run(run_dir, cfg)
        taken = [b for b in blocks if checkpoint.block_step(run_dir, b) is not None
                 or checkpoint.block_state_path(run_dir, b).exists()]
        if taken:
            raise ConfigError(f"block(s) {taken} of {str(run_dir)!r} already have checkpoints; continue them with "
                              f"--resume {run_dir} --blocks {','.join(map(str, taken))}")
        return run_dir, None
    run_dir = _new_run_dir(args, f"{cfg.name}-B{B}")
    if args.blocks is not None:
        checkpoint.join_run(run_dir, cfg)  # other jobs may be joining it already
    else:
        checkpoint.save_config(run_dir, cfg)
    return run_dir, None


def cmd_train(args: argparse.Namespace) -> None:
    from . import distributed
    from .data import load_image_data
    from .train import train

    t_start = time.perf_counter()
    # Everything that can be wrong is checked before any training time is spent.
    if args.resume and args.from_:
        raise ConfigError("--resume continues a run in place and --from starts a new one from it: pass one of them")
    if args.reinit and not args.from_:
        raise ConfigError("--reinit needs --from RUN (it retrains chosen blocks of RUN from scratch)")
    if args.schedule is not None:
        args.overrides = [*args.overrides, f"train.schedule={args.schedule}"]
    if args.task == "classify":  # the ViT label denoiser; named after the digits default
        args.overrides = ["task=classify", "model.arch=vit", "name=digits-vit", *args.overrides]
    cfg = _resolve_train_config(args)
    B = cfg.blocks.num_blocks
    blocks = _parse_blocks(args.blocks, B)
    device = _device(args.device)
    if distributed.launched_by_torchrun() and cfg.train.schedule != "parallel":
        raise ConfigError(f"launched on {os.environ['WORLD_SIZE']} ranks by torchrun: use --schedule parallel "
                          f"(train.schedule is {cfg.train.schedule!r})")
    data = load_image_data(cfg.data)
    _check_data_matches(cfg, data)
    rank, world, device = distributed.init(device)
    try:
        # Rank 0 makes or checks the run directory; every rank learns its path, or the error, from it.
        if rank == 0:
            try:
                found: tuple | str = _prepare_run_dir(args, cfg, blocks)
            except ConfigError as e:
                found = str(e)
        found = distributed.broadcast_object(found if rank == 0 else None)
        if isinstance(found, str):
            raise ConfigError(found)
        run_dir, init_from = found
        if rank == 0:
            logger.info("run directory: %s", run_dir)
            logger.info("%s: %d train / %d held-out images; B=%d blocks of %s layers, training block(s) %s, "
                        "%s schedule, %d steps per block, device %s%s", cfg.data.dataset, len(data.train),
                        len(data.test), B, list(cfg.layer_split()), blocks, cfg.train.schedule,
                        cfg.train.steps_per_block, device, f", starting from {init_from}" if init_from else "")
        with PeakMemory(device) as mem:
            train(cfg, data.train, run_dir, device=device, blocks=blocks, progress=not args.no_progress,
                  init_from=init_from)
        distributed.barrier()
        if rank == 0:
            _finish_run(cfg, run_dir, blocks, mem, device, t_start)
    finally:
        distributed.shutdown()


def _finish_run(cfg: RunConfig, run_dir: Path, blocks: list[int], mem: PeakMemory, device: torch.device,
                t_start: float) -> None:
    """train_summary.json, loss.png and, once every block is trained, samples.png."""
    from .generate import class_labels_evenly, generate
    from .plotting import plot_losses, save_image_grid

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
        logger.info("blocks %s are not trained yet: no %s until every block is", missing,
                    "samples" if cfg.task == "generate" else "evaluation")
    elif cfg.task == "classify":
        from .classify import evaluate_classifier, format_classifier_evaluation

        result = evaluate_classifier(run_dir, device=device)
        summary["evaluation"] = result
        print(format_classifier_evaluation(result))
    else:
        model, _ = checkpoint.from_pretrained(run_dir, device)
        m, s = cfg.model, cfg.sample
        k = max(m.num_classes, 1)
        labels = class_labels_evenly(k * s.samples_per_class, k)
        images = generate(model, labels, image_shape=(m.in_channels, m.image_size, m.image_size),
                          num_classes=m.num_classes, steps=s.steps, sampler=s.sampler, guidance=s.guidance,
                          grid=s.grid, rho=s.rho, seed=cfg.train.seed, device=device)
        save_image_grid(images, run_dir / "samples.png", nrow=s.samples_per_class)
    summary["wall_time_s"] = time.perf_counter() - t_start
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for row in summary["blocks"]:
        logger.info("block %d: %d steps in %.1f s (%.1f steps/s)", row["block"], row["steps"], row["train_time_s"],
                    row["steps_per_s"] or 0.0)
    logger.info("wrote %s (%sloss.png, metrics.jsonl, train_summary.json) in %.1f s", run_dir,
                "samples.png: one row per class, " if cfg.task == "generate" and not missing else "",
                summary["wall_time_s"])


def cmd_sample(args: argparse.Namespace) -> None:
    from .generate import class_labels_evenly, generate
    from .plotting import save_image_grid

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise ConfigError(f"--out {args.out!r} must end in .png or .npz")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"--out {args.out!r} already exists; pass --overwrite to replace it")
    if args.num < 1:
        raise ConfigError(f"--num must be at least 1, got {args.num}")
    device = _device(args.device)
    if checkpoint.read_config(args.run).task != "generate":
        raise ConfigError(f"{args.run} is a classifier: sample draws images from generators; use "
                          f"`diffusionblocks evaluate {args.run}`")
    model, cfg = checkpoint.from_pretrained(args.run, device, stream=args.stream)
    m, s = cfg.model, cfg.sample
    steps = s.steps if args.steps is None else args.steps
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    if args.class_ is not None:
        if m.num_classes == 0:
            raise ConfigError("--class given but the model is unconditional (model.num_classes=0)")
        if not 0 <= args.class_ < m.num_classes:
            raise ConfigError(f"--class {args.class_} is out of range: the model has classes 0..{m.num_classes - 1}")
        labels = torch.full((args.num,), args.class_, dtype=torch.long)
    else:
        labels = class_labels_evenly(args.num, max(m.num_classes, 1))
    images = generate(model, labels, image_shape=(m.in_channels, m.image_size, m.image_size),
                      num_classes=m.num_classes, steps=steps, sampler=args.sampler or s.sampler,
                      guidance=s.guidance if args.guidance is None else args.guidance, grid=args.grid or s.grid,
                      rho=s.rho, seed=args.seed, device=device, progress=not args.no_progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".npz":
        np.savez(out, images=images.numpy().astype(np.float32), labels=labels.numpy().astype(np.int64))
    else:
        nrow = args.num // max(m.num_classes, 1) if args.class_ is None and args.num % max(m.num_classes, 1) == 0 \
            else min(args.num, 10)
        save_image_grid(images, out, nrow=max(nrow, 1))
    logger.info("wrote %d samples to %s", args.num, out)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .diagnostics import write_chain_diagnostics
    from .evaluation import evaluate_run, format_evaluation
    from .plotting import save_image_grid

    cfg = checkpoint.read_config(args.run)
    if cfg.task == "classify":
        from .classify import evaluate_classifier, format_classifier_evaluation

        out = Path(args.out) if args.out else Path(args.run) / f"eval-classify-{args.steps or 'B'}steps"
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise ConfigError(f"{str(out)!r} already exists; pass --overwrite to replace it, or --out another directory")
        result = evaluate_classifier(args.run, steps=args.steps, device=_device(args.device), seed=args.seed)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
        print(format_classifier_evaluation(result))
        return
    s = cfg.sample
    steps, sampler = args.steps or s.steps, args.sampler or s.sampler
    guidance = s.guidance if args.guidance is None else args.guidance
    if args.num < 2:
        raise ConfigError(f"--num must be at least 2, got {args.num}")
    out = Path(args.out) if args.out else Path(args.run) / f"eval-{sampler}-{steps}steps-w{guidance:g}-n{args.num}-seed{args.seed}"
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"{str(out)!r} already exists; pass --overwrite to replace it, or --out another directory")
    result, images = evaluate_run(args.run, num_samples=args.num, steps=steps, sampler=sampler, guidance=guidance,
                                  grid=args.grid, seed=args.seed, diagnostics=not args.no_diagnostics,
                                  device=_device(args.device), cache_dir=args.cache_dir, progress=not args.no_progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    if "chain" in result:
        write_chain_diagnostics(result["chain"], out, title=f"{cfg.name}: oracle vs chain")
    k = cfg.model.num_classes
    per_class = args.num // k
    if per_class >= 1 and args.num % k == 0:
        save_image_grid(images.view(k, per_class, *images.shape[1:])[:, :10].flatten(0, 1), out / "samples.png",
                        nrow=min(per_class, 10))
    print(format_evaluation(result))
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
        cfg = load_config(args.config) if args.config is not None else RunConfig()
        cfg = apply_overrides(cfg, args.overrides)
    comparison_configs(cfg, num_blocks)  # every config is checked before anything runs
    from .data import load_image_data

    _check_data_matches(cfg, load_image_data(cfg.data))
    out = prepare_out_dir(args.out, args.runs_root, cfg.name, args.resume)
    logger.info("comparison directory: %s", out)
    run_comparison(cfg, out, num_blocks=num_blocks, num_samples=args.num, seed=args.seed, device=args.device,
                   cache_dir=args.cache_dir, progress=not args.no_progress)
    print((out / "report.md").read_text().split("\n## ")[0])
    logger.info("wrote %s/report.md", out)


def cmd_status(args: argparse.Namespace) -> None:
    from .models import build_partition

    run = Path(args.run)
    cfg = checkpoint.read_config(run)
    total = cfg.train.steps_per_block
    print(f"{run}: {cfg.name}, B={cfg.blocks.num_blocks} blocks of {list(cfg.layer_split())} layers, "
          f"{total} steps per block, {cfg.train.schedule} schedule")
    done, missing = [], []
    for b in range(cfg.blocks.num_blocks):
        lo, hi = build_partition(cfg).block_range(b)
        info = checkpoint.block_info(run, b)
        if info is None:
            missing.append(b)
            print(f"  block {b} (sigma {lo:.3g}-{hi:.3g}): missing")
            continue
        state = "trained" if info["step"] >= total else f"partial, {100 * info['step'] / total:.0f}%"
        if info["step"] >= total:
            done.append(b)
        print(f"  block {b} (sigma {lo:.3g}-{hi:.3g}): {state}, step {info['step']}/{total}, "
              f"{info['train_time_s']:.0f} s of training")
    ready = "every block is present: the model can be sampled" if not missing else \
        f"missing block(s) {missing}: train them with --blocks {','.join(map(str, missing))}"
    print(f"  {len(done)}/{cfg.blocks.num_blocks} trained; {ready}")


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
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {args.out!r} already exists and is not empty; choose another directory")
    run_benchmark(args.model, args.image_size, args.channels, args.batch, args.steps, num_blocks, device, out)


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    """Sampling options that default to the run's sample.* config."""
    p.add_argument("--steps", type=int, help="denoising steps (default: the run's sample.steps)")
    p.add_argument("--sampler", choices=["euler", "heun", "dpmpp_2m"], help="default: the run's sample.sampler")
    p.add_argument("--grid", choices=["quantile", "karras"], help="sigma grid (default: the run's sample.grid)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance weight (default: the run's)")


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--task", choices=["generate", "classify"], help="shortcut: classify = task=classify "
                   "model.arch=vit (a ViT label denoiser; with no --config, on the digits)")
    p.add_argument("--schedule", choices=["sequential", "interleaved", "parallel"],
                   help="shortcut for train.schedule=...; parallel: launch with torchrun, one group of ranks per block")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample images from a trained run",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--num", type=int, default=100, help="number of samples")
    p.add_argument("--class", dest="class_", type=int, help="class of every sample (default: classes covered evenly)")
    _add_sampler_args(p)
    p.add_argument("--seed", type=int, default=0, help="sample i uses the noise of seed (seed, i)")
    p.add_argument("--device", help="cpu, cuda... (default: cuda if available)")
    p.add_argument("--out", required=True, help="output: .png grid, or .npz with images (N,C,H,W in [-1,1]) and labels")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--stream", action="store_true", help="keep one block in memory at a time (models larger than "
                   "the device): each block is loaded from disk when the sampler reaches its noise levels")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="conditional accuracy, FD, KID and chain diagnostics of a trained run",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--num", type=int, default=1000, help="number of class-conditional samples (classes covered evenly)")
    _add_sampler_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and the real-image subsets")
    p.add_argument("--out", help="output directory (default: RUN/eval-<settings>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-diagnostics", action="store_true", help="skip the chain diagnostics")
    p.add_argument("--cache-dir", help="reference classifier cache (default: $DIFFUSIONBLOCKS_CACHE or "
                   "~/.cache/diffusionblocks)")
    p.add_argument("--device", help="cpu, cuda... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
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

    p = sub.add_parser("status", help="which blocks of a run are trained, how far, and which are missing")
    p.add_argument("run", metavar="RUN", help="run directory")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True).add_parser(
        "memory", help="peak training memory and step time: end-to-end vs DiffusionBlocks, each in a fresh process",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="dit-s2", help="dit-s2 (12 layers, hidden 384), dit-b2 (12, 768) or tiny")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--steps", type=int, default=3, help="steps per block (timings are medians after the first)")
    p.add_argument("--num-blocks", default="2,3,4,6", help="values of B")
    p.add_argument("--device", help="cpu, cuda... (default: cuda if available)")
    p.add_argument("--out", help="directory for memory.md, memory.json, memory.png")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench_memory)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    # Denormal floats are slow on x86 CPUs, and the blocks of the lowest noise levels produce them (a
    # classifier's nearly saturated cross-entropy at sigma ~ 0.002, scaled by c_out ~ sigma): the last
    # digits-ViT block trained at 3.1 steps/s instead of 14.9. Flush them to zero, now, before torch
    # starts the worker threads that inherit the setting.
    torch.set_flush_denormal(True)
    try:
        args.func(args)
    except ConfigError as e:
        print(f"diffusionblocks {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with `diffusionblocks train --resume RUN`", file=sys.stderr)
        return 130
    return 0
