"""Distances between sets of feature vectors: Frechet distance and kernel (KID-style) distance; and who decides
along a chain of blocks (each block's share of what the chain removes).

Features are N x d arrays (the reference classifier's penultimate activations, or pixels).
Both distances are computed in float64 with numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _as_f64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)  # (N, d)


def gaussian_stats(feats: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d) of N x d features."""
    f = _as_f64(feats)
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(S: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (negative round-off eigenvalues clipped)."""
    w, V = np.linalg.eigh((S + S.T) / 2)
    return (V * np.sqrt(np.clip(w, 0, None))) @ V.T


def frechet_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits (Heusel et al. 2017).

    tr((S_a S_b)^(1/2)) is taken as tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), which has the same eigenvalues and
    is symmetric, so it needs no complex arithmetic.
    """
    mu_a, S_a = gaussian_stats(feats_a)
    mu_b, S_b = gaussian_stats(feats_b)
    r = _sqrt_psd(S_a)
    M = r @ S_b @ r
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((M + M.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(S_a) + np.trace(S_b) - 2 * tr_sqrt)


def kernel_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor, *,
                    num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018, "KID").

    Averaged over random subsets of min(subset_size, N_a, N_b) vectors each; returns (mean, std over subsets).
    Unbiased, so it is about 0 for two samples of one distribution, even at small N.
    """
    a, b = _as_f64(feats_a), _as_f64(feats_b)
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx = (x @ x.T / d + 1) ** 3
        k_yy = (y @ y.T / d + 1) ** 3
        k_xy = (x @ y.T / d + 1) ** 3
        mmd2 = ((k_xx.sum() - np.trace(k_xx)) + (k_yy.sum() - np.trace(k_yy))) / (m * (m - 1)) - 2 * k_xy.mean()
        values.append(mmd2)
    return float(np.mean(values)), float(np.std(values))


def decision_shares(start: float, after: list[float], owners: list[int]) -> list[dict[str, Any]]:
    """Who decides along a chain (issue 28): what is left undecided after each step of the chain, `after` (a top-1
    error, bits), the block that ran each step, `owners` (non-increasing noise: each block's steps are consecutive),
    and what was left before the first step, `start` (chance's error). Per block that ran: what its steps removed
    and its share of all the chain removed (negative where a block undid a decision; NaN where the chain ends no
    better than it started, so there is nothing to share)."""
    total = start - after[-1]
    rows, before = [], start
    for b in dict.fromkeys(owners):  # the blocks in the order they ran
        last = max(i for i, o in enumerate(owners) if o == b)
        removed = before - after[last]
        rows.append({"block": b, "steps": owners.count(b), "bits_in": before, "bits_out": after[last],
                     "removed": removed, "share": removed / total if total > 0 else float("nan")})
        before = after[last]
    return rows


def shares_text(rows: list[dict[str, Any]]) -> str:
    """'block 0 0.93, block 1 0.05, block 2 0.02': each block's share of what the chain decided ('-' for none)."""
    return ", ".join(f"block {r['block']} " + ("-" if r["share"] != r["share"] else f"{r['share']:.2f}") for r in rows)
