"""Chain diagnostics: does a chain of independently trained blocks compose? (method.md section 7)

Each block is trained on its own distribution of inputs, y + sigma eps with real y. At inference it
receives instead what the blocks before it produced. For every denoising step i (sigma_i, block b_i)
this module measures the same quantities on both inputs, with the same class labels:

- oracle: z = y + sigma_i eps for held-out real y (the block's training distribution);
- chain: x_i, the sampler's actual state at step i, started from sigma_max eps.

Measures: the reference classifier's accuracy on the conditional denoised estimate D(., sigma_i | label)
(oracle and chain; their gap is the composition error), the oracle's lambda-weighted denoising error,
and the input shift, the Frechet distance in pixel space between c_in x_i and c_in z (0 when the chain
hands each block exactly the distribution it was trained on).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from .data import ImageData
from .generate import initial_noise
from .metrics import decision_shares, frechet_distance
from .noise import sigma_grid
from .precond import append_dims, get_scalings, loss_weight
from .reference import ReferenceClassifier, predict
from .sampling import SAMPLERS, CFGDenoiser
from .seeding import make_generator


@torch.no_grad()
def chain_diagnostics(model, real: ImageData | Sequence[ImageData], clf: ReferenceClassifier, *, num: int = 500,
                      steps: int = 50, sampler: str = "euler", guidance: float = 2.0, grid: str = "quantile",
                      rho: float = 7.0, seed: int = 0, device: str | torch.device = "cpu",
                      decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Per-step and per-block oracle vs chain measures for a class-conditional BlockwiseDenoiser.

    real: held-out images, or one set per block (a composed model's blocks trained on other domains: each
    block's oracle is its own training distribution); the sets must carry the same labels in the same order.
    decode: for a model of latents (`real` holds latents), maps its estimates to the pixel images the classifier
    judges; the input shift is then measured between latents.
    """
    judged = (lambda x: x.clamp(-1, 1)) if decode is None else (lambda x: decode(x).clamp(-1, 1))  # noqa: E731
    reals = [real] * model.num_blocks if isinstance(real, ImageData) else list(real)
    n = min(num, *(len(r) for r in reals))
    labels = reals[0].labels[:n].to(device)  # (n,)
    if any(not torch.equal(r.labels[:n], reals[0].labels[:n]) for r in reals):
        raise ValueError("chain_diagnostics: the blocks' held-out sets must have the same labels in the same order")
    ys = [r.images[:n].to(device) for r in reals]  # per block (n, C, H, W)
    y = ys[0]
    sigmas = sigma_grid(model.partition.axis, steps, grid, rho).to(device, torch.float32)
    # EDM's weighting and input scaling of the measures; a block of another parameterization (flow, vp-eps) has no
    # sigma_data of its own and is measured with EDM's default 0.5.
    sigma_data = getattr(model.blocks[0], "sigma_data", 0.5)
    null = model.blocks[0].inner_model.num_classes
    D_guided = CFGDenoiser(model, guidance, null_class=null) if null > 0 else model
    s_in = y.new_ones([n])

    states: list[torch.Tensor] = []
    SAMPLERS[sampler](D_guided, initial_noise(tuple(y.shape[1:]), [seed * 1_000_003 + i for i in range(n)]).to(device)
                      * sigmas[0], sigmas, extra_args={"class_labels": labels},
                      callback=lambda d: states.append(d["x"].clone()), disable=True)

    rows = []
    for i, x_i in enumerate(states):
        sigma = sigmas[i] * s_in
        b = int(model.partition.owner(sigma[:1])[0])
        y = ys[b]
        eps = torch.randn(y.shape, generator=make_generator(seed, "oracle", i)).to(device)
        z = y + append_dims(sigma, y.ndim) * eps
        D_oracle = model(z, sigma, class_labels=labels)
        D_chain = model(x_i, sigma, class_labels=labels)
        c_in = float(get_scalings(sigmas[i], sigma_data)[2])
        rows.append({
            "step": i, "sigma": float(sigmas[i]), "block": b,
            "oracle_accuracy": float((predict(clf, judged(D_oracle)) == labels.cpu()).double().mean()),
            "chain_accuracy": float((predict(clf, judged(D_chain)) == labels.cpu()).double().mean()),
            "oracle_weighted_mse": float((loss_weight(sigma, sigma_data)
                                          * (D_oracle - y).pow(2).flatten(1).mean(1)).mean()),
            "input_shift_fd": frechet_distance(c_in * x_i, c_in * z),
        })
    blocks = []
    for b in range(model.num_blocks):
        r = [row for row in rows if row["block"] == b]
        if not r:
            continue
        mean = lambda k: sum(row[k] for row in r) / len(r)  # noqa: E731
        blocks.append({"block": b, "steps": len(r), "sigma_range": model.partition.block_range(b),
                       "oracle_accuracy": mean("oracle_accuracy"), "chain_accuracy": mean("chain_accuracy"),
                       "composition_gap": mean("oracle_accuracy") - mean("chain_accuracy"),
                       "oracle_weighted_mse": mean("oracle_weighted_mse"), "input_shift_fd": mean("input_shift_fd")})
    return {"num": n, "steps": steps, "sampler": sampler, "guidance": guidance, "grid": grid, "seed": seed,
            "per_step": rows, "per_block": blocks, "decision": who_decides(rows, sigma_data, max(null, 1))}


def who_decides(rows: list[dict[str, Any]], sigma_data: float, num_classes: int) -> dict[str, Any]:
    """Each block's share of what the chain decides (issue 28): of the reference classifier's error, from chance
    (1 - 1/K) to the last step's, along the chain and on the oracle input; and of the information the oracle's
    denoising error says remains to be revealed (int mmse / sigma^2 dln sigma, each stretch between two steps given
    to the block of its upper step)."""
    owners = [row["block"] for row in rows]
    chance = 1 - 1 / num_classes
    out = {k: decision_shares(chance, [1 - row[f"{k}_accuracy"] for row in rows], owners) for k in ("chain", "oracle")}
    levels = torch.tensor([row["sigma"] for row in rows], dtype=torch.float64)
    mmse = torch.tensor([row["oracle_weighted_mse"] for row in rows], dtype=torch.float64) / loss_weight(levels,
                                                                                                          sigma_data)
    f = mmse / levels ** 2  # descending levels; the last stretch ends at the last step's level
    stretches = (f[1:] + f[:-1]) / 2 * (levels[:-1].log() - levels[1:].log())
    total = float(stretches.sum())
    info = {}
    for i, b in enumerate(owners[:-1]):
        info[b] = info.get(b, 0.0) + float(stretches[i])
    out["information"] = [{"block": b, "share": v / total if total else float("nan")} for b, v in info.items()]
    return out


def plot_chain_diagnostics(diag: dict[str, Any], out_path: str | Path, title: str = "") -> None:
    """Oracle vs chain accuracy per step (their gap is the composition error) and the input shift."""
    rows = diag["per_step"]
    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(8, 5.5))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.plot(steps, [r["oracle_accuracy"] for r in rows], label="oracle input y + sigma eps", lw=1.5)
    ax1.plot(steps, [r["chain_accuracy"] for r in rows], label="chain trajectory", lw=1.5)
    ax1.set_ylabel("classifier accuracy of D(x)")
    ax1.set_ylim(0, 1.02)
    ax1.legend(loc="lower right")
    ax2.plot(steps, [r["input_shift_fd"] for r in rows], color="C3", lw=1.5)
    ax2.set_ylabel("input shift (pixel FD)")
    ax2.set_xlabel("denoising step (sigma descending)")
    ax2.set_yscale("symlog", linthresh=1e-2)
    for ax in (ax1, ax2):
        for b in sorted({r["block"] for r in rows}):
            s = [r["step"] for r in rows if r["block"] == b]
            ax.axvspan(min(s) - 0.5, max(s) + 0.5, color=f"C{b}", alpha=0.08)
            if ax is ax1:
                ax.text((min(s) + max(s)) / 2, 0.04, f"block {b}", ha="center", fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)


def write_chain_diagnostics(diag: dict[str, Any], out_dir: Path, title: str = "") -> None:
    (out_dir / "chain_diagnostics.json").write_text(json.dumps(diag, indent=2) + "\n")
    plot_chain_diagnostics(diag, out_dir / "chain_diagnostics.png", title)
