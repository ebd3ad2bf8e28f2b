"""The `diffusionblocks` command: train, sample, evaluate, compare, compose, convert, import, status, install-judge,
bench memory and speed.

This module parses the command line and calls the functions that do the work: a run's life is in
runs.py (train, sample, evaluate, status), which Python code can call the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from . import precision, rundir, runs
from .compare import comparison_configs, prepare_out_dir, run_comparison
from .compose import compose_run, parse_block_sources
from .config import ConfigError, RunConfig
from .convert import convert_run, import_run
from .judge import install_judge
from .membench import child_main, model_config, run_benchmark
from .options import EvaluateOptions, SampleOptions, flag, option_type, own_fields
from .speedbench import parse_modes, run_speed_benchmark
from .tasks import apply_overrides, available, default_config, get_task, load_config, read_config

logger = logging.getLogger("diffusionblocks")


def cmd_train(args: argparse.Namespace) -> None:
    overrides = list(args.overrides)
    if args.schedule is not None:
        overrides.append(f"train.schedule={args.schedule}")
    if args.task is not None:  # first, so that the other overrides apply to that task's config
        overrides.insert(0, f"task={args.task}")
    runs.train_run(args.config, args.out, overrides=overrides, resume=args.resume, from_=args.from_,
                   blocks=args.blocks, reinit=args.reinit, runs_root=args.runs_root, device=args.device,
                   progress=not args.no_progress, on_run_dir=lambda run_dir: setattr(args, "run_dir", run_dir))


def _option_values(args: argparse.Namespace, cls: type) -> dict:
    """The options of class `cls` that the command line holds (a switch not given is left to its default)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def cmd_sample(args: argparse.Namespace) -> None:
    cls = getattr(args.run_task, "sample_options", SampleOptions)
    runs.sample_run(args.run, **_option_values(args, cls))


def cmd_evaluate(args: argparse.Namespace) -> None:
    cls = getattr(args.run_task, "evaluate_options", EvaluateOptions)
    evaluated = runs.evaluate_run(args.run, **_option_values(args, cls))
    print(evaluated.summary)
    logger.info("wrote %s", evaluated.out)


def compared_blocks(out: str | None, resume: bool) -> str:
    """compare's default --num-blocks: on --resume the B's the comparison in `out` has (its configs/B*.json besides
    B=1), so that resuming never trains a B the comparison did not have; else 2,3,4."""
    found = sorted(int(p.stem[1:]) for p in Path(out).glob("configs/B*.json") if p.stem[1:].isdigit()) if (
        resume and out) else []
    return ",".join(str(B) for B in found if B != 1) or "2,3,4"


def cmd_compare(args: argparse.Namespace) -> None:
    spec = args.num_blocks or compared_blocks(args.out, args.resume)
    try:
        num_blocks = [int(b) for b in spec.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--num-blocks {spec!r} is not a comma-separated list of integers") from None
    if args.resume and args.out and (Path(args.out) / "config.json").is_file():
        if args.config or args.overrides:
            raise ConfigError("--resume continues a comparison with its own config.json; do not pass --config or overrides")
        cfg = read_config(args.out)
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
    runs.check_output_dir(out)
    cfg = compose_run(sources, out, args.overrides)
    for b, run in sorted(sources.items()):
        logger.info("block %d: from %s", b, run)
    logger.info("wrote %s (%s, B=%d): sample, evaluate and status work on it like on any run", out, cfg.name,
                cfg.blocks.num_blocks)


def cmd_convert(args: argparse.Namespace) -> None:
    out = Path(args.out)
    runs.check_output_dir(out)
    cfg = convert_run(args.run, args.num_blocks, args.init, out, args.overrides)
    logger.info("wrote %s (%s, B=%d blocks of %s layers, --init %s from %s): fine-tune it with train --from %s; "
                "sample, evaluate, status and compose work on it like on any run", out, cfg.name, cfg.blocks.num_blocks,
                list(cfg.layer_split()), args.init, args.run, out)


def cmd_import(args: argparse.Namespace) -> None:
    out = Path(args.out)
    runs.check_output_dir(out)
    cfg = import_run(apply_overrides(load_config(args.config), args.overrides), out)
    logger.info("wrote %s (%s, B=1, the pretrained model %s): sample, evaluate, convert it into blocks or fine-tune it "
                "with train --from %s", out, cfg.name, cfg.model.pretrained, out)


def cmd_status(args: argparse.Namespace) -> None:
    print(runs.run_status(args.run))


def cmd_install_judge(args: argparse.Namespace) -> None:
    target = read_config(args.run) if args.for_ is None else (
        read_config(args.for_) if Path(args.for_).is_dir() else load_config(args.for_))
    entry = install_judge(args.run, target, args.cache_dir)
    logger.info("installed the judge %s as %s: `evaluate --judge auto` of a run on its data uses it", args.run, entry)


def cmd_bench_memory(args: argparse.Namespace) -> None:
    if args.child is not None:
        child_main(args.child)
        return
    try:
        num_blocks = [int(b) for b in args.num_blocks.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--num-blocks {args.num_blocks!r} is not a comma-separated list of integers") from None
    device = str(runs.resolve_device(args.device))
    out = _bench_out(args)
    base, title = _bench_config(args)
    measures = tuple(m.strip() for m in args.cpu_measure.split(",") if m.strip())
    run_benchmark(base, args.config is None, args.steps, num_blocks, device, out, title, measures)


def _bench_out(args: argparse.Namespace) -> Path | None:
    """A benchmark's --out: a new or empty directory."""
    if not args.out:
        return None
    out = Path(args.out)
    runs.check_output_dir(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {args.out!r} already exists and is not empty; choose another directory")
    return out


def _bench_config(args: argparse.Namespace) -> tuple[RunConfig, str]:
    """What a benchmark measures: --config, or a DiT of --model size on random images, with the overrides; and its
    title."""
    if args.config is not None:
        base = apply_overrides(load_config(args.config), args.overrides)
        return base, f"{base.name} ({base.task}), batch {base.train.batch_size}"
    base = apply_overrides(model_config(args.model, args.image_size, args.channels, args.batch), args.overrides)
    extra = f" ({' '.join(args.overrides)})" if args.overrides else ""
    return base, f"{args.model} at {args.image_size}x{args.image_size}, batch {args.batch}{extra}"


def cmd_bench_speed(args: argparse.Namespace) -> None:
    device = runs.resolve_device(args.device)
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


def _add_options(parser, cls: type, fields: list[dataclasses.Field]) -> None:
    """The flags of options dataclass `cls`'s fields (options.py says how a field becomes a flag)."""
    for f in fields:
        kind, meta = option_type(cls, f.name), f.metadata
        if kind is bool:  # a switch; not given, the option keeps its default
            parser.add_argument(flag(f), dest=f.name, action="store_false" if f.default else "store_true",
                                default=argparse.SUPPRESS, help=meta.get("help"))
        else:
            parser.add_argument(flag(f), dest=f.name, type=kind, default=f.default, choices=meta.get("choices"),
                                required=bool(meta.get("required")), metavar=meta.get("metavar"), help=meta.get("help"))


def _task_options_help(kind: str) -> str:
    """The options each built-in task adds to `sample` or `evaluate`, for the verb's --help."""
    base = {"sample": SampleOptions, "evaluate": EvaluateOptions}[kind]
    lines = ["options of the run's task (with RUN given, --help lists them in full):"]
    for name in available():
        parser = argparse.ArgumentParser(prog="", add_help=False)
        try:
            cls = getattr(get_task(name), f"{kind}_options", None)
        except (ConfigError, ImportError) as e:  # a broken task must not break the other commands
            lines.append(f"  {name}: unavailable ({e})")
            continue
        if cls is not None:
            _add_options(parser, cls, own_fields(cls, base))
        usage = parser.format_usage().replace("usage:", "").strip() or "(none)"
        lines.append(f"  {name}: {usage}")
    return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the epilog's lines kept as written."""


def _add_run_verb(sub, verb: str, help: str, base: type, func, run_task) -> None:
    """`sample` or `evaluate` RUN: the options every task's runs take (`base`'s fields), then those of RUN's task."""
    p = sub.add_parser(verb, help=help, epilog=_task_options_help(verb), formatter_class=_HelpFormatter)
    p.add_argument("run", metavar="RUN", help="run directory")
    _add_options(p, base, dataclasses.fields(base))
    options = getattr(run_task, f"{verb}_options", None) if run_task is not None else None
    if options is not None:
        _add_options(p.add_argument_group(f"options of {run_task.name!r} runs"), options, own_fields(options, base))
    p.set_defaults(func=func, run_task=run_task)


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
    _add_keep_freed_memory(p)
    p.set_defaults(func=cmd_train)

    _add_run_verb(sub, "sample", "draw samples from a trained run", SampleOptions, cmd_sample, run_task)
    _add_run_verb(sub, "evaluate", "the task's metrics of a trained run (images: conditional accuracy, FD, KID, chain "
                  "diagnostics; classifiers: accuracy along the chain)", EvaluateOptions, cmd_evaluate, run_task)

    p = sub.add_parser("compare", help="end-to-end (B=1) vs DiffusionBlocks at several B, equal compute, one report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides for every run")
    p.add_argument("--config", help="JSON config file (see presets/)")
    p.add_argument("--num-blocks", help="values of B to compare with B=1 (default: 2,3,4; on --resume, the "
                   "comparison's own)")
    p.add_argument("--num", type=int, default=1000, help="samples per run for the metrics")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (the same for every run)")
    p.add_argument("--out", help="report directory (default: a new numbered directory under --runs-root)")
    p.add_argument("--runs-root", default="runs", help="where a new report directory goes")
    p.add_argument("--resume", action="store_true", help="continue the comparison in --out: train what is missing")
    p.add_argument("--cache-dir", help="reference classifier cache")
    p.add_argument("--device", help="cpu, cuda... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_keep_freed_memory(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("compose", help="a new run whose blocks are copied from other runs (blocks trained apart, "
                       "e.g. on other data, chained as one model)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="name=..., data.* (what it is "
                   "evaluated on) or sample.* of the new run; the rest is the config of block 0's source")
    p.add_argument("--block", action="append", required=True, metavar="INDEX=RUN", help="take block INDEX (or "
                   "INDEX,INDEX...) from RUN; repeat for every block, e.g. --block 0=runs/a --block 1,2=runs/b")
    p.add_argument("--out", required=True, help="the new run directory (must not exist, or be empty)")
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser("convert", help="a new run of B blocks made from an end-to-end run (B=1): its layers split by "
                       "depth, or the whole network copied into every block",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", metavar="RUN", help="the end-to-end run (blocks.num_blocks=1) to convert")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="name=..., train.*, data.* or sample.* "
                   "of the new run (what train --from may change); the model and noise are RUN's")
    p.add_argument("--num-blocks", type=int, required=True, metavar="B", help="blocks of the new run")
    p.add_argument("--init", choices=["depth", "copy"], default="depth", help="depth: block b gets layers "
                   "[bL/B, (b+1)L/B) and its own copies of the embeddings and head; copy: every block is the whole "
                   "network (L layers per block)")
    p.add_argument("--out", required=True, help="the new run directory (must not exist, or be empty)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("import", help="an end-to-end run (B=1) whose block is a pretrained model (model.pretrained: "
                       "a diffusers DiT or a transformers Llama saved by save_pretrained), to sample, evaluate, "
                       "convert or fine-tune",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides, e.g. "
                   "model.pretrained=DIR")
    p.add_argument("--config", required=True, help="JSON config file (see presets/)")
    p.add_argument("--out", required=True, help="the new run directory (must not exist, or be empty)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("install-judge", help="copy a trained judge run (`train --config presets/shakespeare-judge.json`) "
                       "into the cache of independent judges, checked against the judge its data would get")
    p.add_argument("run", metavar="RUN", help="the trained judge run")
    p.add_argument("--for", dest="for_", metavar="RUN_OR_CONFIG", help="a run or config whose data it judges "
                   "(default: the judge run's own data section)")
    p.add_argument("--cache-dir", help="judge cache (default: $DIFFUSIONBLOCKS_CACHE or ~/.cache/diffusionblocks)")
    p.set_defaults(func=cmd_install_judge)

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
    _add_keep_freed_memory(p)
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
    _add_keep_freed_memory(p)
    p.set_defaults(func=cmd_bench_speed)
    for p in (*sub.choices.values(), *bench.choices.values()):
        p.add_argument("--traceback", action="store_true", help="on an error, print its traceback before the "
                       "one-line message (for a bug report, or a task module of yours that fails to import)")
    return parser


def _add_keep_freed_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="on the CPU (glibc): keep freed memory (up to 256 MiB) for reuse instead of returning it "
                   "to the kernel: language-model steps up to 14%% faster, the resident set not handed back after "
                   "a peak (precision.keep_freed_memory)")


def _run_task(argv: list[str]):
    """For `sample RUN ...` and `evaluate RUN ...`: the task of RUN (the first argument that is a run directory),
    so that the parser knows its options wherever they stand; None otherwise."""
    if not argv or argv[0] not in ("sample", "evaluate"):
        return None
    run = next((a for a in argv[1:] if not a.startswith("-") and (Path(a) / "config.json").is_file()), None)
    return get_task(read_config(run).task) if run is not None else None


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
    precision.flush_denormals()  # now, before torch starts the worker threads that inherit it
    if getattr(args, "keep_freed_memory", False) and not precision.keep_freed_memory():
        logger.warning("--keep-freed-memory: the C library is not glibc; its allocator is left as it is")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args.func(args)
        sys.stdout.flush()  # now, so that a reader gone away is seen here rather than at exit
    except ConfigError as e:
        run_dir = getattr(args, "run_dir", None)
        hint = f"; once it can be written, continue with `diffusionblocks train --resume {run_dir}`" \
            if isinstance(e, rundir.CheckpointWriteError) and run_dir is not None and Path(run_dir).is_dir() else ""
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
