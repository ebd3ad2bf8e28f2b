"""Classification by label denoising: inference along the chain of blocks, accuracy and chain diagnostics.

Inference (method.md section 5): start from z = sigma_max eps in label-embedding space and walk a
descending sigma grid of `steps` points (default B: each block once, the cost of one end-to-end
forward pass). At each step the owning block gives logits; the estimate softmax(logits) @ E drives an
Euler step; the prediction is the last step's argmax.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .data import ImageData, load_image_data, make_generator
from .generate import sigma_grid
from .models import ViTClassifier
from .precond import append_dims


@torch.no_grad()
def chain_logits(model, images: torch.Tensor, steps: int | None = None, grid: str = "quantile",
                 seed: int = 0) -> list[torch.Tensor]:
    """Logits (N, K) at every inference step of a BlockwiseDenoiser of ViT label denoisers; the last is the answer."""
    steps = steps or model.num_blocks
    sigmas = sigma_grid(model.partition.axis, steps, grid).to(images.device, torch.float32)
    first = model.blocks[int(model.partition.owner(sigmas[:1])[0])]
    N, D = images.shape[0], first.label_embedding.shape[1]
    z = torch.randn(N, D, generator=make_generator(seed, "classify")).to(images.device) * sigmas[0]
    s_in = z.new_ones([N])
    out = []
    for i in range(steps):
        block = model.blocks[int(model.partition.owner(sigmas[i:i + 1])[0])]
        _, logits = block.denoise(z, sigmas[i] * s_in, images)
        y_hat = logits.softmax(-1) @ block.E  # (N, D): the estimate between steps
        # Euler step (the last one, to sigma = 0, lands on the estimate).
        z = z + (sigmas[i + 1] - sigmas[i]) * (z - y_hat) / sigmas[i]
        out.append(logits.float())
    return out


@torch.no_grad()
def predict_logits(model, images: torch.Tensor, steps: int | None = None, batch_size: int = 500,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(final logits, logits per step) for a chain of label denoisers, or for a plain classifier (one step), batched."""
    plain = isinstance(model.blocks[0], ViTClassifier)
    finals, per_step = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        logits = [model.blocks[0].logits(x)] if plain else chain_logits(model, x, steps)
        finals.append(logits[-1].cpu())
        per_step.append([l.cpu() for l in logits])
    steps_logits = [torch.cat([p[j] for p in per_step]) for j in range(len(per_step[0]))]
    return torch.cat(finals), steps_logits


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(1).double().mean())


@torch.no_grad()
def oracle_accuracy(model, data: ImageData, b: int, sigmas: list[float], seed: int = 0, batch_size: int = 500,
                    device: str | torch.device = "cpu") -> float:
    """Block b's accuracy on its own training distribution: inputs E[label] + sigma eps at the given sigmas."""
    block = model.blocks[b]
    correct = total = 0
    for j, sigma in enumerate(sigmas):
        for i in range(0, len(data), batch_size):
            x, labels = data.images[i:i + batch_size].to(device), data.labels[i:i + batch_size].to(device)
            y = block.E[labels]
            eps = torch.randn(y.shape, generator=make_generator(seed, "oracle", b, j, i)).to(device)
            s = torch.full((len(x),), sigma, device=device)
            _, logits = block.denoise(y + append_dims(s, y.ndim) * eps, s, x)
            correct += int((logits.argmax(1) == labels).sum())
            total += len(x)
    return correct / total


def evaluate_classifier(run_dir: str | Path, *, steps: int | None = None, device: str | torch.device = "cpu",
                        seed: int = 0) -> dict[str, Any]:
    """Held-out accuracy (top-1, top-5 where there are more than 5 classes), per-step chain accuracy and the
    oracle accuracy of each block at the noise levels of its own inference steps."""
    from .checkpoint import from_pretrained

    model, cfg = from_pretrained(run_dir, device)
    data = load_image_data(cfg.data).test
    K = cfg.model.num_classes
    steps = steps or cfg.classify.inference_steps or cfg.blocks.num_blocks
    t0 = time.perf_counter()
    logits, per_step = predict_logits(model, data.images, steps if cfg.classify.mode == "diffusion" else None,
                                      device=device)
    infer_s = time.perf_counter() - t0
    r: dict[str, Any] = {"run": str(run_dir), "num_blocks": cfg.blocks.num_blocks, "mode": cfg.classify.mode,
                         "num_test": len(data), "top1": topk_accuracy(logits, data.labels, 1),
                         "inference_s": infer_s}
    if K > 5:
        r["top5"] = topk_accuracy(logits, data.labels, 5)
    if cfg.classify.mode == "diffusion":
        sigmas = sigma_grid(model.partition.axis, steps).tolist()[:-1]
        owners = model.partition.owner(torch.tensor(sigmas)).tolist()
        r["steps"] = steps
        r["per_step"] = [{"step": i, "sigma": s, "block": o, "chain_accuracy": topk_accuracy(l, data.labels, 1)}
                         for i, (s, o, l) in enumerate(zip(sigmas, owners, per_step))]
        r["per_block"] = []
        for b in range(cfg.blocks.num_blocks):
            own = [row for row in r["per_step"] if row["block"] == b]
            if not own:
                continue
            oracle = oracle_accuracy(model, data, b, [row["sigma"] for row in own], seed=seed, device=device)
            chain = sum(row["chain_accuracy"] for row in own) / len(own)
            r["per_block"].append({"block": b, "steps": len(own), "sigma_range": model.partition.block_range(b),
                                   "oracle_accuracy": oracle, "chain_accuracy": chain,
                                   "composition_gap": oracle - chain})
    return r


def format_classifier_evaluation(r: dict[str, Any]) -> str:
    lines = [f"{r['run']}: B={r['num_blocks']} ({r['mode']}), {r['num_test']} held-out images",
             f"  top-1 accuracy {r['top1']:.4f}" + (f", top-5 {r['top5']:.4f}" if "top5" in r else "")
             + f"  (inference {r['inference_s']:.2f} s)"]
    for row in r.get("per_step", []):
        lines.append(f"  step {row['step']} (sigma {row['sigma']:.3g}, block {row['block']}): chain accuracy "
                     f"{row['chain_accuracy']:.4f}")
    for b in r.get("per_block", []):
        lines.append(f"  block {b['block']}: oracle accuracy {b['oracle_accuracy']:.4f}, chain "
                     f"{b['chain_accuracy']:.4f} (gap {b['composition_gap']:+.4f})")
    return "\n".join(lines)
