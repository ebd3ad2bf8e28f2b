"""The parts every task's comparison report shares: what each run cost to train, markdown tables, loss curves.

`compare` trains and evaluates the runs; each task writes its own report.md from its metrics with these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .config import RunConfig
from .plotting import read_metrics


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


def equal_compute(c: RunConfig, baseline: str, per_example: str = "") -> str:
    """The report's first sentence, on what each run trained (without its full stop): every block as many steps
    as the end-to-end `baseline`."""
    return (f"Equal training compute: every block gets {c.train.steps_per_block} steps of batch {c.train.batch_size}"
            f"{per_example}, as does the end-to-end {baseline}")


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
    Bs = list(configs)
    fig = Figure(figsize=(3.4 * len(Bs), 3))
    axes = fig.subplots(1, len(Bs), squeeze=False, sharey=True)
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

