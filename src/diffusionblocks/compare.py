"""End-to-end (B=1) against DiffusionBlocks at several B, at equal training compute, in one report.

Every block gets as many optimiser steps as the end-to-end model, so each run evaluates the same
number of layers in training (method.md section 3). Each run trains in its own process (so its peak
memory is its own), then all are evaluated with the same metrics, sample count and seeds.
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

from .checkpoint import new_run_dir, save_config
from .config import ConfigError, RunConfig
from .evaluation import evaluate_run
from .plotting import image_grid, read_metrics

logger = logging.getLogger(__name__)


def even_split(L: int, B: int) -> tuple[int, ...] | None:
    """None when L layers split evenly into B blocks, else the most even explicit split (earlier blocks larger)."""
    if L % B == 0:
        return None
    return tuple(L // B + (1 if i < L % B else 0) for i in range(B))


def comparison_configs(cfg: RunConfig, num_blocks: list[int]) -> dict[int, RunConfig]:
    """One config per B (B=1 always included), identical but for the partition of the layers."""
    out = {}
    for B in sorted({1, *num_blocks}):
        blocks = dataclasses.replace(cfg.blocks, num_blocks=B, layers_per_block=even_split(cfg.model.depth, B))
        c = dataclasses.replace(cfg, name=f"{cfg.name}-B{B}", blocks=blocks)
        if cfg.task == "classify":  # B=1 is the plain ViT classifier, the end-to-end baseline
            classify = dataclasses.replace(cfg.classify, mode="plain" if B == 1 else "diffusion")
            c = dataclasses.replace(c, classify=classify)
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
    """Trains what is missing in out_dir, evaluates every run, writes the report; returns its data."""
    configs = comparison_configs(cfg, list(num_blocks))
    (out_dir / "configs").mkdir(parents=True, exist_ok=True)
    save_config(out_dir, cfg)
    for B, c in configs.items():
        config_path = out_dir / "configs" / f"B{B}.json"
        config_path.write_text(c.to_json() + "\n")
        run = out_dir / f"B{B}"
        if not _trained(c, run):
            _train(c, run, config_path, device, progress)
    eval_device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.task == "classify":
        return _compare_classifiers(cfg, configs, out_dir, eval_device, seed)
    results, grids = {}, {}
    for B in configs:
        run = out_dir / f"B{B}"
        r, images = evaluate_run(run, num_samples=num_samples, seed=seed, device=eval_device, cache_dir=cache_dir,
                                 progress=progress)
        r["train_summary"] = json.loads((run / "train_summary.json").read_text())
        (run / "evaluation.json").write_text(json.dumps(r, indent=2) + "\n")
        results[B] = r
        per_class = num_samples // configs[B].model.num_classes
        grids[B] = images.view(configs[B].model.num_classes, per_class, *images.shape[1:])[:, :8].flatten(0, 1) \
            if num_samples % configs[B].model.num_classes == 0 and per_class >= 1 else images[:80]
    report = {"config": cfg.to_dict(), "num_samples": num_samples, "seed": seed, "runs": {str(B): r for B, r in results.items()}}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_report(out_dir, configs, results, grids)
    return report


def _compare_classifiers(cfg: RunConfig, configs: dict[int, RunConfig], out_dir: Path, device: str,
                         seed: int) -> dict[str, Any]:
    """The classification report: accuracy, per-step chain accuracy and oracle accuracy per block."""
    from .classify import evaluate_classifier

    results = {}
    for B in configs:
        run = out_dir / f"B{B}"
        r = evaluate_classifier(run, device=device, seed=seed)
        r["train_summary"] = json.loads((run / "train_summary.json").read_text())
        (run / "evaluation.json").write_text(json.dumps(r, indent=2) + "\n")
        results[B] = r
    c1 = configs[1]
    top5 = c1.model.num_classes > 5
    header = ["B", "layers per block", "top-1", *(["top-5"] if top5 else []), "train s", "ms/step per block",
              "inference s", "peak train mem MiB"]
    lines = [f"# End-to-end ViT vs DiffusionBlocks classification: {c1.data.dataset}", "",
             f"Equal training compute: every block gets {c1.train.steps_per_block} steps of batch "
             f"{c1.train.batch_size}, as does the end-to-end ViT (B=1, a plain classifier with the same layers). "
             f"ViT: {c1.model.depth} layers, width {c1.model.hidden_size}; label embedding "
             f"{cfg.classify.label_embedding}; {cfg.train.schedule} schedule; inference: "
             f"{cfg.classify.inference_steps or 'B'} steps. Held-out images: {results[1]['num_test']}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for B, r in results.items():
        ts = r["train_summary"]
        per_step = [b["train_time_s"] / b["steps"] for b in ts["blocks"]]
        mem = ts.get("peak_train_memory_bytes")
        row = [str(B), "/".join(map(str, configs[B].layer_split())), f"{r['top1']:.4f}",
               *([f"{r['top5']:.4f}"] if top5 else []), f"{sum(b['train_time_s'] for b in ts['blocks']):.0f}",
               " / ".join(f"{1000 * t:.1f}" for t in per_step), f"{r['inference_s']:.2f}",
               f"{mem / 2**20:.0f}" if mem is not None else "n/a"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Chain diagnostics", "", "Accuracy after each block's step along the chain, next to the block's "
              "accuracy on its own training distribution (true label embedding + sigma eps) at the same noise levels.",
              "", "| B | block | steps | sigma range | oracle acc. | chain acc. | gap |", "|---|---|---|---|---|---|---|"]
    for B, r in results.items():
        for b in r.get("per_block", []):
            lo, hi = b["sigma_range"]
            lines.append(f"| {B} | {b['block']} | {b['steps']} | {lo:.3g}-{hi:.3g} | {b['oracle_accuracy']:.4f} | "
                         f"{b['chain_accuracy']:.4f} | {b['composition_gap']:+.4f} |")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    report = {"config": cfg.to_dict(), "seed": seed, "runs": {str(B): r for B, r in results.items()}}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot_classifier_comparison(out_dir, results)
    return report


def _plot_classifier_comparison(out_dir: Path, results: dict[int, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Bs = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(Bs, [results[B]["top1"] for B in Bs], "o-")
    axes[0].set_xlabel("B (1 = end-to-end ViT)")
    axes[0].set_xticks(Bs)
    axes[0].set_title("top-1 accuracy")
    for B in Bs[1:]:
        rows = results[B]["per_step"]
        axes[1].plot([r["step"] for r in rows], [r["chain_accuracy"] for r in rows], "o-", label=f"B={B}")
    axes[1].set_xlabel("inference step")
    axes[1].set_title("accuracy along the chain")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "metrics_vs_B.png", dpi=110)
    plt.close(fig)


def _row(B: int, c: RunConfig, r: dict[str, Any]) -> list[str]:
    ts = r["train_summary"]
    blocks = ts["blocks"]
    s_per_step = [b["train_time_s"] / b["steps"] for b in blocks]
    mem = ts.get("peak_train_memory_bytes")
    return [str(B), "/".join(map(str, c.layer_split())), f"{r['conditional_accuracy']:.4f}", f"{r['fd']:.3f}",
            f"{r['kid']:.4f}", f"{sum(b['train_time_s'] for b in blocks):.0f}", f"{ts.get('wall_time_s', 0):.0f}",
            " / ".join(f"{1000 * s:.1f}" for s in s_per_step), f"{r['sampling_s']:.2f}",
            f"{mem / 2**20:.0f}" if mem is not None else "n/a"]


def write_report(out_dir: Path, configs: dict[int, RunConfig], results: dict[int, dict], grids: dict) -> None:
    """report.md with the table, and the plots it links."""
    cfg1, r1 = configs[1], results[1]
    header = ["B", "layers per block", "cond. acc.", "FD", "KID", "train s (steps)", "job wall s",
              "ms/step per block", "sampling s", "peak train mem MiB"]
    lines = [f"# End-to-end vs DiffusionBlocks: {cfg1.data.dataset}", "",
             f"Equal training compute: every block gets {cfg1.train.steps_per_block} steps of batch "
             f"{cfg1.train.batch_size}, as does the end-to-end model (B=1), so every run evaluates the same number of "
             f"layers. Model: DiT, {cfg1.model.depth} layers, width {cfg1.model.hidden_size}; {cfg1.train.schedule} "
             "schedule. Samples: "
             f"{r1['num_samples']} class-conditional ({r1['sampler']}, {r1['steps']} steps, guidance {r1['guidance']}, "
             f"{r1['grid']} grid, seed {r1['seed']}); held-out real images: {r1['num_heldout']}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_row(B, configs[B], results[B])) + " |" for B in configs]
    lines += ["", f"Real-vs-real floor ({r1['num_real_floor']} real training images vs the held-out set): "
              f"FD {r1['fd_real_floor']:.3f}, KID {r1['kid_real_floor']:.4f}. Reference classifier: held-out accuracy "
              f"{r1['reference_classifier']['heldout_accuracy']:.4f} on {r1['reference_classifier']['num_heldout']} "
              "images.", "",
              "Peak train memory: " + ("CUDA max_memory_allocated" if "cuda" in str(r1["train_summary"].get("device"))
                                       else "peak resident set size above the process' size before training") +
              ". Sampling time: all samples, the same number of steps for every B (each step runs one block's layers).",
              "", "## Chain diagnostics (composition)", "",
              "Classifier accuracy of the denoised estimate, on the block's training distribution (oracle, real "
              "y + sigma eps) and on the chain's own trajectory, averaged over each block's steps; input shift is the "
              "pixel-space Frechet distance between what the chain hands the block and what it was trained on.", "",
              "| B | block | steps | sigma range | oracle acc. | chain acc. | gap | input shift FD |", "|---|---|---|---|---|---|---|---|"]
    for B, r in results.items():
        for b in r["chain"]["per_block"]:
            lo, hi = b["sigma_range"]
            lines.append(f"| {B} | {b['block']} | {b['steps']} | {lo:.3g}-{hi:.3g} | {b['oracle_accuracy']:.3f} | "
                         f"{b['chain_accuracy']:.3f} | {b['composition_gap']:+.3f} | {b['input_shift_fd']:.4f} |")
    lines += ["", "![metrics vs B](metrics_vs_B.png)", "", "![loss curves](loss_curves.png)", "",
              "![samples](samples_side_by_side.png)", "", "![chain](chain_gap.png)", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    _plots(out_dir, configs, results, grids)


def _plots(out_dir: Path, configs: dict[int, RunConfig], results: dict[int, dict], grids: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Bs = list(configs)
    r1 = results[1]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    axes[0].plot(Bs, [results[B]["conditional_accuracy"] for B in Bs], "o-")
    axes[0].set_title("conditional accuracy")
    axes[1].plot(Bs, [results[B]["fd"] for B in Bs], "o-", label="samples")
    axes[1].axhline(r1["fd_real_floor"], color="gray", ls="--", label="real vs real")
    axes[1].set_title("Frechet distance")
    axes[1].legend()
    axes[2].plot(Bs, [results[B]["kid"] for B in Bs], "o-")
    axes[2].axhline(r1["kid_real_floor"], color="gray", ls="--")
    axes[2].set_title("KID")
    for ax in axes:
        ax.set_xlabel("B (1 = end-to-end)")
        ax.set_xticks(Bs)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "metrics_vs_B.png", dpi=110)
    plt.close(fig)

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

    fig, axes = plt.subplots(1, len(Bs), figsize=(3.2 * len(Bs), 3.6), squeeze=False)
    for ax, B in zip(axes[0], Bs):
        g = image_grid(grids[B], nrow=8)
        ax.imshow(g[..., 0] if g.shape[-1] == 1 else g, cmap="gray", interpolation="nearest")
        ax.set_title(f"B={B}: acc {results[B]['conditional_accuracy']:.3f}, FD {results[B]['fd']:.2f}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_dir / "samples_side_by_side.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.4))
    for B in Bs:
        rows = results[B]["chain"]["per_step"]
        line, = ax.plot([r["step"] for r in rows], [r["chain_accuracy"] for r in rows], lw=1.3, label=f"B={B} chain")
        ax.plot([r["step"] for r in rows], [r["oracle_accuracy"] for r in rows], lw=1, ls="--", color=line.get_color(),
                label=f"B={B} oracle")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("classifier accuracy of D(x)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "chain_gap.png", dpi=110)
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
