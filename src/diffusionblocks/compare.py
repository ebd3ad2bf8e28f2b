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

from .rundir import new_run_dir, save_config
from .config import ConfigError, RunConfig
from .tasks import ComparingTask, get_task, importable_by_name

logger = logging.getLogger(__name__)


def even_split(L: int, B: int) -> tuple[int, ...] | None:
    """None when L layers split evenly into B blocks, else the most even explicit split (earlier blocks larger)."""
    if L % B == 0:
        return None
    return tuple(L // B + (1 if i < L % B else 0) for i in range(B))


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
    for B in configs:
        run = out_dir / f"B{B}"
        ev = task.evaluate(run, options)
        ev.result["train_summary"] = json.loads((run / "train_summary.json").read_text())
        (run / "evaluation.json").write_text(json.dumps(ev.result, indent=2) + "\n")
        results[B], artifacts[B] = ev.result, ev.artifacts
    report = {"config": cfg.to_dict(), "num_samples": num_samples, "seed": seed,
              "runs": {str(B): r for B, r in results.items()}}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    task.write_comparison(out_dir, configs, results, artifacts)
    return report


def training_cost(c: RunConfig, result: dict[str, Any]) -> dict[str, str]:
    """The report's cells on what a run cost to train: its layers, time, speed and peak memory."""
    ts = result["train_summary"]
    blocks = ts["blocks"]
    mem = ts.get("peak_train_memory_bytes")
    return {"layers per block": "/".join(map(str, c.layer_split())),
            "train s": f"{sum(b['train_time_s'] for b in blocks):.0f}",
            "job wall s": f"{ts.get('wall_time_s', 0):.0f}",
            "ms/step per block": " / ".join(f"{1000 * b['train_time_s'] / b['steps']:.1f}" for b in blocks),
            "peak train mem MiB": f"{mem / 2**20:.0f}" if mem is not None else "n/a"}


def markdown_table(header: list[str], rows: list[dict[str, str]]) -> list[str]:
    """The lines of a markdown table whose columns are `header`, each row a dict over those names."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row[h] for h in header) + " |" for row in rows)]


def memory_note(result: dict[str, Any]) -> str:
    """What the peak-memory column measured."""
    return "Peak train memory: " + ("CUDA max_memory_allocated" if "cuda" in str(result["train_summary"].get("device"))
                                    else "peak resident set size above the process' size before training") + "."


def plot_loss_curves(out_dir: Path, configs: dict[int, RunConfig]) -> None:
    """loss_curves.png: one panel per run, one curve per block, from each run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import read_metrics

    Bs = list(configs)
    fig, axes = plt.subplots(1, len(Bs), figsize=(3.4 * len(Bs), 3), squeeze=False, sharey=True)
    for ax, B in zip(axes[0], Bs):
        rows = read_metrics(out_dir / f"B{B}" / "metrics.jsonl")
        for b in range(B):
            r = [row for row in rows if row["block"] == b]
            ax.plot([x["step"] for x in r], [x["loss"] for x in r], lw=1, label=f"block {b}")
        ax.set_title(f"B={B}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("weighted loss")
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curves.png", dpi=110)
    plt.close(fig)


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
