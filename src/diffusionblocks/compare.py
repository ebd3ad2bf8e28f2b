"""End-to-end (B=1) against DiffusionBlocks at several B, at equal training compute, in one report.

Every block gets as many optimiser steps as the end-to-end model, so each run evaluates the same
number of layers in training (method.md section 3). Each run trains in its own process (so its peak
memory is its own), then all are evaluated by the task with the same settings and seeds, and the task
writes the report (its metrics, plots and samples) next to report.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from . import precision
from .config import ConfigError, RunConfig, even_split
from .rundir import code_version, new_run_dir, save_config
from .tasks import ComparingTask, get_task, importable_by_name

logger = logging.getLogger(__name__)


def comparison_configs(cfg: RunConfig, num_blocks: list[int]) -> dict[int, RunConfig]:
    """One config per B (B=1 always included), identical but for the partition of the layers; B=1 is the
    task's end-to-end baseline."""
    task = get_task(cfg.task)
    if not isinstance(task, ComparingTask):
        missing = [m for m in ("evaluate_options", "evaluate", "write_comparison") if not hasattr(task, m)]
        raise ConfigError(f"task {cfg.task!r} cannot be compared: it does not define {' or '.join(missing)}")
    if not importable_by_name(cfg.task):
        raise ConfigError(f"compare trains each run in a fresh process, where task {cfg.task!r} (registered from "
                          "Python) is unknown: name it in the config as 'package.module:TaskClass'")
    out = {}
    for B in sorted({1, *num_blocks}):
        blocks = dataclasses.replace(cfg.blocks, num_blocks=B, layers_per_block=even_split(cfg.model.depth, B))
        c = task.comparison_config(dataclasses.replace(cfg, name=f"{cfg.name}-B{B}", blocks=blocks))
        c.validate()
        out[B] = c
    return out


def _train(cfg: RunConfig, run: Path, config_path: Path, device: str | None, progress: bool) -> None:
    """Trains (or resumes) one run in a fresh process."""
    cmd = [sys.executable, "-m", "diffusionblocks", "train"]
    cmd += ["--resume", str(run)] if (run / "config.json").exists() else ["--config", str(config_path), "--out", str(run)]
    if device:
        cmd += ["--device", device]
    if not progress:
        cmd += ["--no-progress"]
    if precision.kept_freed_memory:  # `compare --keep-freed-memory`: for the training too
        cmd += ["--keep-freed-memory"]
    logger.info("training B=%d: %s", cfg.blocks.num_blocks, " ".join(cmd))
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise ConfigError(f"training B={cfg.blocks.num_blocks} in {str(run)!r} failed (exit {result.returncode}); "
                          f"fix the cause and rerun with --resume")


def _trained(cfg: RunConfig, run: Path) -> bool:
    path = run / "train_summary.json"
    if not path.is_file():
        return False
    s = json.loads(path.read_text())
    return all(b["steps"] >= cfg.train.steps_per_block for b in s["blocks"])


def run_comparison(cfg: RunConfig, out_dir: Path, *, num_blocks: list[int] = (2, 3, 4), num_samples: int = 1000,
                   seed: int = 0, device: str | None = None, cache_dir: str | Path | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Trains what is missing in out_dir, evaluates every run the same way, writes the report; returns its data."""
    task = get_task(cfg.task)
    configs = comparison_configs(cfg, list(num_blocks))
    (out_dir / "configs").mkdir(parents=True, exist_ok=True)
    save_config(out_dir, cfg)
    for B, c in configs.items():
        config_path = out_dir / "configs" / f"B{B}.json"
        config_path.write_text(c.to_json() + "\n")
        run = out_dir / f"B{B}"
        if not _trained(c, run):
            _train(c, run, config_path, device, progress)
    # The task's own options at their defaults (the runs' settings), the same for every run.
    options = task.evaluate_options(num=num_samples, seed=seed, progress=progress,
                                    cache_dir=None if cache_dir is None else str(cache_dir),
                                    device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results, artifacts = {}, {}
    evaluated = code_version()  # the code the evaluations start with (a checkout while they run changes nothing here)
    mode = precision.resolve(options.precision, torch.device(options.device))
    for B in configs:
        run = out_dir / f"B{B}"
        with precision.matmul_mode(mode), precision.autocast(mode, torch.device(options.device)):
            ev = task.evaluate(run, options)  # in the arithmetic `evaluate` uses
        ev.result["train_summary"] = json.loads((run / "train_summary.json").read_text())
        (run / "evaluation.json").write_text(json.dumps(ev.result, indent=2) + "\n")
        results[B], artifacts[B] = ev.result, ev.artifacts
    code = {"evaluated": evaluated, "trained": {str(B): r["train_summary"].get("code") for B, r in results.items()}}
    report = {"config": cfg.to_dict(), "num_samples": num_samples, "seed": seed, "code": code,
              "runs": {str(B): r for B, r in results.items()}}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    task.write_comparison(out_dir, configs, results, artifacts)
    trained = ", ".join(f"B={B} `{c or 'unrecorded'}`" for B, c in code["trained"].items())
    with open(out_dir / "report.md", "a") as f:
        f.write(f"\nCode: trained with {trained} (the last training command's); evaluated with "
                f"`{code['evaluated']}`.\n")
    return report


def prepare_out_dir(out: str | None, runs_root: str, name: str, resume: bool) -> Path:
    """The report directory: a new one, or an existing one only when resuming."""
    if out is None:
        if resume:
            raise ConfigError("--resume needs --out DIR, the comparison to continue")
        return new_run_dir(runs_root, f"compare-{name}")
    path = Path(out)
    if path.exists() and any(path.iterdir()) and not resume:
        raise ConfigError(f"{str(path)!r} already exists and is not empty; pass --resume to continue that comparison, "
                          "or choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    return path
