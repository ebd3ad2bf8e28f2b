"""Pictures of a run: sample grids (PNG) and loss curves per block."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image


def image_grid(images: torch.Tensor, nrow: int, padding: int = 1) -> np.ndarray:
    """N x C x H x W in [-1, 1] -> uint8 H' x W' x C grid with `nrow` images per row."""
    N, C, H, W = images.shape
    ncol_rows = -(-N // nrow)
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    grid = np.full((ncol_rows * (H + padding) + padding, nrow * (W + padding) + padding, C), 255, np.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        grid[top:top + H, left:left + W] = x[i]
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int, scale: int | None = None) -> None:
    """Writes a PNG grid; small images are enlarged (nearest neighbour) to at least 32 pixels a side."""
    grid = image_grid(images, nrow)
    if scale is None:
        scale = max(1, -(-32 // images.shape[-1]))
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def read_metrics(path: str | Path) -> list[dict]:
    """metrics.jsonl rows, keeping the last row for each (block, step) (a resumed run rewrites some steps); none when
    there is no file (a run whose blocks were all copied from runs without one)."""
    rows: dict[tuple[int, int], dict] = {}
    if not Path(path).is_file():
        return []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if "block" in r and "step" in r:
                rows[(r["block"], r["step"])] = r
    return sorted(rows.values(), key=lambda r: (r["block"], r["step"]))


def plot_losses(metrics_path: str | Path, out_path: str | Path, num_blocks: int, title: str = "") -> None:
    """One panel per block: the weighted denoising loss against the block's steps."""
    rows = read_metrics(metrics_path)
    fig = Figure(figsize=(3.6 * num_blocks, 3.0))
    axes = fig.subplots(1, num_blocks, squeeze=False, sharey=True)
    for b, ax in enumerate(axes[0]):
        r = [row for row in rows if row["block"] == b]
        ax.plot([row["step"] for row in r], [row["loss"] for row in r], lw=1.2)
        ax.set_title(f"block {b}" + (" (highest noise)" if b == 0 and num_blocks > 1 else ""))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("lambda-weighted L2 loss")
    axes[0][0].set_yscale("log")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
