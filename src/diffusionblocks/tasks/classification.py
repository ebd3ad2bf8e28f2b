"""Classification by label denoising with ViT blocks (method.md section 5, second row).

The class label is a point E[label] of a label-embedding table with L2-normalised rows; each block
denoises it for its range of sigma, conditioned on the image, and its loss is the cross-entropy of the
logits its head reads off the denoised estimate, weighted by lambda(sigma). The end-to-end baseline of
`compare` (model.mode="plain", B=1) is the same ViT trained as a plain classifier.

Inference: start from z in label-embedding space at sigma_max and walk a descending sigma grid of `steps` points
(default B: each block once, the cost of one end-to-end forward pass). At each step the owning block gives logits;
the estimate softmax(logits) @ E drives a step of `sample.sampler` (Euler by default, through the router:
`blocks.BridgedDenoiser`); the prediction is the last step's argmax. The start (`sample.start`): "mean", z = 0, the
prior's mean, a deterministic path that keeps block 0's posterior as a blend of the classes for the later blocks to
weigh against the image (the chain's mode: what an argmax asks for); or "noise", z = sigma_max eps, the diffusion
sampler's draw, which makes the chain a sampler of labels from its posterior: its accuracy is then that of a draw,
not of the posterior's argmax, which loses points wherever the posterior is unsure (issue 28: MNIST at a short
budget, 60.5% from noise against 85.0% from the mean, block 0's own argmax 75.7%).

The label table. "fixed" (a random orthonormal table frozen from the seed) keeps the blocks independent.
"learned_first" (block 0 learns it, the others take it frozen) and "learned_joint" (one table that every
block's optimiser updates, the reference code's) make blocks depend on each other: `LabelCoupling`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from .. import checkpoint
from ..blocks import BridgedDenoiser
from ..config import ConfigError, RunConfig, check_choice
from ..data import BatchSampler, DataConfig, ImageData, ImageSplits, load_image_data
from ..metrics import decision_shares, shares_text
from ..models.layers import label_embedding_table
from ..models.vit import ViTClassifier, ViTLabelDenoiser
from ..noise import BLOCK_GRID, GRID_NAMES, Partition, sigma_grid
from ..options import EvaluateOptions, option
from ..precond import append_dims
from ..pretrained import from_pretrained
from ..report import equal_compute, markdown_table, memory_note, training_cost
from ..sampling import SAMPLERS
from ..seeding import make_generator
from .base import Coupling, Evaluation, Task, layers_of_denoiser
from .image_generation import ImageModelConfig, image_batch_sampler, load_matching_images, write_classes

STARTS = ("mean", "noise")  # sample.start: where the chain begins at sigma_max (see the module's docstring)


@dataclass(frozen=True)
class ClassifierModelConfig(ImageModelConfig):
    mode: str = "diffusion"      # "diffusion" (blocks denoise the label embedding) or "plain" (the end-to-end
                                 # baseline: the same ViT as an ordinary classifier, B = 1), as the AR LM's model.mode.

    def validate(self) -> None:
        super().validate()
        check_choice("model.mode", self.mode, ("diffusion", "plain"))


@dataclass(frozen=True)
class ClassifyConfig:
    label_embedding: str = "fixed"        # "fixed": a random orthonormal table frozen from the seed, so blocks
                                          # are independent (any schedule); "learned_first": learned with block 0,
                                          # then frozen for the others (sequential); "learned_joint": one table
                                          # learned by whichever block runs (interleaved; the reference code's).
    loss_weighting: str = "per_sample"    # "per_sample": lambda(sigma_i) CE_i; "batch_mean": mean(lambda) CE_i,
                                          # the reference code's.

    def validate(self) -> None:
        check_choice("classify.label_embedding", self.label_embedding, ("fixed", "learned_first", "learned_joint"))
        check_choice("classify.loss_weighting", self.loss_weighting, ("per_sample", "batch_mean"))


@dataclass(frozen=True)
class ClassifySampleConfig:
    """The chain's inference (sample.steps and sample.sampler mean what they mean in every task)."""

    steps: int = 0               # Denoising steps; 0 = B (each block once).
    sampler: str = "euler"       # A name of sampling.SAMPLERS ("euler": the paper's).
    grid: str = "quantile"       # The noise levels: "quantile" (equal training mass, the paper's), "karras", or
                                 # "blocks" (steps / B inside each block's range, none at sigma_min; issue 28).
    start: str = "mean"          # The chain's start at sigma_max: "mean" (z = 0: the deterministic path to the chain's
                                 # mode) or "noise" (z = sigma_max eps: a label drawn from the chain's posterior).

    def validate(self) -> None:
        check_choice("sample.sampler", self.sampler, tuple(SAMPLERS))
        check_choice("sample.start", self.start, STARTS)
        check_choice("sample.grid", self.grid, GRID_NAMES)
        if self.steps < 0:
            raise ConfigError(f"sample.steps must be >= 0, got {self.steps}")


@dataclass(frozen=True)
class ClassificationConfig(RunConfig):
    name: str = "digits-vit"
    task: str = "classify"
    model: ClassifierModelConfig = field(default_factory=lambda: ClassifierModelConfig(arch="vit"))
    data: DataConfig = field(default_factory=DataConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    sample: ClassifySampleConfig = field(default_factory=ClassifySampleConfig)

    @classmethod
    def upgrade_config(cls, d: dict[str, Any]) -> dict[str, Any]:
        """Older configs: the baseline switch and the inference settings sat in "classify" (mode, inference_steps,
        sampler); before tasks had their own sections a config also carried model.class_dropout and the generator's
        "sample" section (guidance, grid...), which meant nothing here."""
        d = dict(d)
        classify, model, sample = d.get("classify"), d.get("model"), d.get("sample")
        if isinstance(sample, dict) and set(sample) & {"guidance", "rho", "samples_per_class"}:
            sample = d["sample"] = {k: v for k, v in sample.items() if k in ("steps", "sampler")}
        if isinstance(model, dict) and "class_dropout" in model:
            model = d["model"] = {k: v for k, v in model.items() if k != "class_dropout"}
        if not isinstance(classify, dict) or not {"mode", "inference_steps", "sampler"} & set(classify):
            return d
        moved = {k: classify[k] for k in ("mode", "inference_steps", "sampler") if k in classify}
        d["classify"] = {k: v for k, v in classify.items() if k not in moved}
        if "mode" in moved:
            d["model"] = {**(model if isinstance(model, dict) else {}), "mode": moved["mode"]}
        d["sample"] = {**(sample if isinstance(sample, dict) else {}),
                       **{new: moved[old] for old, new in (("inference_steps", "steps"), ("sampler", "sampler"))
                          if old in moved}}
        return d

    def validate(self) -> None:
        """The fields checked by section, then the rules across sections."""
        super().validate()
        check_choice("model.arch", self.model.arch, ("vit",))
        c, B, schedule = self.classify, self.blocks.num_blocks, self.train.schedule
        if self.model.mode == "plain" and B != 1:
            raise ConfigError(f"model.mode='plain' is the end-to-end baseline: it needs blocks.num_blocks=1, "
                              f"got {B}")
        if self.sample.grid == BLOCK_GRID and (self.sample.steps or B) % B:
            raise ConfigError(f"sample.grid='blocks' gives each block as many steps: sample.steps={self.sample.steps} "
                              f"is not a multiple of blocks.num_blocks={B}")
        if c.label_embedding == "learned_joint" and B > 1 and schedule != "interleaved":
            raise ConfigError("classify.label_embedding='learned_joint' is shared by the blocks: it needs "
                              f"train.schedule='interleaved', got {schedule!r} (use 'fixed' or "
                              "'learned_first' for independent blocks)")
        if c.label_embedding == "learned_first" and B > 1 and schedule != "sequential":
            raise ConfigError("classify.label_embedding='learned_first' needs block 0 trained before the "
                              f"others: it needs train.schedule='sequential', got {schedule!r} (use 'fixed')")
        if self.model.num_classes < 2:
            raise ConfigError(f"classification needs model.num_classes >= 2, got {self.model.num_classes}")


JOINT_LABEL_FILE = "label_embedding.safetensors"  # the shared table of "learned_joint" runs


@dataclass(frozen=True)
class ClassifyEvaluateOptions(EvaluateOptions):
    steps: int | None = option(None, "denoising steps (default: the run's sample.steps, or B)")
    sampler: str | None = option(None, "default: the run's sample.sampler", choices=tuple(SAMPLERS))
    start: str | None = option(None, "the chain's start: mean (z = 0) or noise (default: the run's sample.start)",
                               choices=STARTS)


def run_label_embedding(cfg: RunConfig) -> torch.Tensor:
    """The run's initial label-embedding table, the same for every block: drawn from (seed, "label-embedding")."""
    return label_embedding_table(cfg.model.num_classes, cfg.model.hidden_size,
                                 make_generator(cfg.train.seed, "label-embedding"))


class ClassificationTask(Task):
    name = "classify"
    config_class = ClassificationConfig
    evaluate_options = ClassifyEvaluateOptions

    def comparison_config(self, cfg: RunConfig) -> RunConfig:
        """B=1: the plain ViT classifier with the same layers; B>1: label-denoising blocks."""
        mode = "plain" if cfg.blocks.num_blocks == 1 else "diffusion"
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mode=mode))

    def remaining_measure(self, cfg: RunConfig) -> str | None:
        """The label's held-out cross-entropy at each noise level (the plain classifier has no noise axis)."""
        return "cross-entropy" if cfg.model.mode == "diffusion" else None

    def load_data(self, cfg: RunConfig) -> ImageSplits:
        return load_matching_images(cfg, conditional_ok=False)

    def batch_sampler(self, cfg: RunConfig, data: ImageData, b: int) -> BatchSampler:
        return image_batch_sampler(cfg, data, b)

    def prepare_run(self, cfg: RunConfig, run_dir: Path, data: ImageSplits) -> None:
        write_classes(run_dir, data)

    def build_block(self, cfg: RunConfig, b: int, generator: torch.Generator | None = None) -> nn.Module:
        """A ViT label denoiser of block b's layers (for model.mode="plain", the whole ViT as a classifier)."""
        m = cfg.model
        vit = dict(image_size=m.image_size, in_channels=m.in_channels, patch_size=m.patch_size,
                   hidden_size=m.hidden_size, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, num_classes=m.num_classes)
        if cfg.model.mode == "plain":
            net = ViTClassifier(depth=m.depth, **vit)
            net.initialize_weights(generator)
            return net
        lo, hi = self.partition(cfg).training_range(b)
        mode = cfg.classify.label_embedding
        learn = mode == "learned_joint" or (mode == "learned_first" and b == 0)
        net = ViTLabelDenoiser(depth=cfg.layer_split()[b], sigma_data=cfg.noise.sigma_data, sigma_min=lo,
                               sigma_max=hi, learn_embedding=learn, **vit)
        net.initialize_weights(generator)
        with torch.no_grad():
            net.label_embedding.copy_(run_label_embedding(cfg))
        return net

    def split_weights(self, cfg: RunConfig, weights: dict[str, torch.Tensor], first: int,
                      last: int) -> dict[str, torch.Tensor]:
        """ViT label-denoiser layers [first, last) and copies of the rest; a plain ViT classifier is refused."""
        return layers_of_denoiser(cfg, weights, first, last, "ViT classifier")

    def loss_inputs(self, cfg: RunConfig, partition: Partition, b: int, batch: tuple[torch.Tensor, torch.Tensor],
                    generator: torch.Generator) -> dict[str, Any]:
        """The label's embedding is denoised, conditioned on the image; the plain classifier needs no noise."""
        images, labels = batch
        if cfg.model.mode == "plain":
            return {"images": images, "labels": labels}
        n = images.shape[0]
        at = generator.device  # every draw where the generator is (the device, when the data is resident there)
        sigma = partition.sample(b, n, generator=generator, device=at).float()
        noise = torch.randn(n, cfg.model.hidden_size, generator=generator, device=at)
        return {"images": images, "labels": labels, "sigma": sigma, "noise": noise,
                "weighting": cfg.classify.loss_weighting}

    def coupling(self, cfg: RunConfig, run_dir: Path | None, device: torch.device,
                 trained: dict[int, Any]) -> Coupling:
        if cfg.model.mode != "diffusion" or cfg.classify.label_embedding == "fixed":
            return Coupling()
        return LabelCoupling(cfg, run_dir, device, trained)

    def after_training(self, cfg: RunConfig, run_dir: Path, device: torch.device) -> dict[str, Any]:
        """The held-out evaluation with the run's inference settings, printed and kept in the summary."""
        result = evaluate_classifier(run_dir, device=device)
        print(format_classifier_evaluation(result))
        return {"evaluation": result}

    def evaluate(self, run_dir: Path, options: ClassifyEvaluateOptions) -> Evaluation:
        """Top-1 (and top-5), the accuracy after each step of the chain and each block's oracle accuracy."""
        if options.steps is not None and options.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {options.steps}")
        return Evaluation(evaluate_classifier(run_dir, steps=options.steps, device=options.device, seed=options.seed,
                                              sampler=options.sampler, start=options.start))

    def evaluation_name(self, cfg: RunConfig, options: ClassifyEvaluateOptions) -> str:
        sampler, start = options.sampler or cfg.sample.sampler, options.start or cfg.sample.start
        return f"eval-classify-{options.steps or cfg.sample.steps or 'B'}steps" + ("" if sampler == "euler" else
                                                                                f"-{sampler}") \
            + ("" if start == "mean" else f"-{start}")

    def format_evaluation(self, result: dict[str, Any]) -> str:
        return format_classifier_evaluation(result)

    def write_comparison(self, out_dir: Path, configs: dict[int, RunConfig], results: dict[int, dict[str, Any]],
                         artifacts: dict[int, Any]) -> None:
        write_classification_report(out_dir, configs, results)


class LabelCoupling(Coupling):
    """The label table that blocks hand each other ("learned_first") or share ("learned_joint")."""

    def __init__(self, cfg: RunConfig, run_dir: Path | None, device: torch.device, trained: dict[int, Any]):
        self.cfg, self.run_dir, self.trained = cfg, run_dir, trained
        self.mode = cfg.classify.label_embedding
        # learned_joint, interleaved: one parameter that every block's optimiser updates.
        self.shared = nn.Parameter(run_label_embedding(cfg).to(device)) \
            if self.mode == "learned_joint" and cfg.train.schedule == "interleaved" else None
        self.rewrite_at_end = self.shared is not None

    def attach(self, b: int, block: nn.Module) -> None:
        if self.shared is not None:
            block.label_embedding = self.shared
        elif self.mode == "learned_first" and b > 0:
            with torch.no_grad():
                block.label_embedding.copy_(self._first_block_table(b))

    def _first_block_table(self, b: int) -> torch.Tensor:
        """Block 0's trained label embedding, which the blocks after it use frozen."""
        state = self.trained.get(0)
        if state is not None and state.resident:
            return state.denoiser.label_embedding.detach().clone()
        if self.run_dir is not None and checkpoint.block_step(self.run_dir, 0) == self.cfg.train.steps_per_block:
            return checkpoint.load_block_tensor(self.run_dir, 0, "label_embedding")
        raise ConfigError(f"classify.label_embedding='learned_first': block 0 learns the label embedding, so it must "
                          f"be trained to the end before block {b}")

    def resumed(self, blocks: dict[int, nn.Module]) -> None:
        path = self.run_dir / JOINT_LABEL_FILE if self.run_dir is not None else None
        if self.shared is not None and path is not None and path.is_file():
            with torch.no_grad():  # the blocks' files hold older snapshots; the run's file holds the latest
                self.shared.copy_(checkpoint.load_tensor_file(path, "label_embedding"))

    def save(self, run_dir: Path, block: nn.Module) -> None:
        if self.mode == "learned_joint":
            checkpoint.save_tensor_file(run_dir / JOINT_LABEL_FILE, {"label_embedding": block.label_embedding.detach()})


# ---- inference and evaluation


def label_bridge(block: nn.Module, D: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The estimate between inference steps: softmax(logits) @ E (method.md section 5)."""
    return logits.softmax(-1) @ block.E  # (N, D)


@torch.no_grad()
def chain_logits(model, images: torch.Tensor, steps: int | None = None, grid: str = "quantile",
                 seed: int = 0, sampler: str = "euler", start: str = "mean") -> list[torch.Tensor]:
    """Logits (N, K) at every inference step of a BlockwiseDenoiser of ViT label denoisers (those of each step's first
    evaluation, at its own sigma), from z = 0 (start "mean") or z = sigma_max eps ("noise"); the last is the answer."""
    steps = steps or model.num_blocks
    sigmas = sigma_grid(model.partition.axis, steps, grid, partition=model.partition).to(images.device, torch.float32)
    N, D = images.shape[0], model.blocks[0].label_embedding.shape[1]  # block 0 owns sigma_max, the first step's
    if start == "mean":
        z = torch.zeros(N, D, device=images.device)
    else:
        z = torch.randn(N, D, generator=make_generator(seed, "classify")).to(images.device) * sigmas[0]
    chain = BridgedDenoiser(model, label_bridge)
    out = []
    SAMPLERS[sampler](chain, z, sigmas, extra_args={"images": images},
                      callback=lambda _: out.append(chain.logits.float()), disable=True)
    return out


@torch.no_grad()
def predict_logits(model, images: torch.Tensor, steps: int | None = None, batch_size: int = 500,
                   device: str | torch.device = "cpu", sampler: str = "euler",
                   grid: str = "quantile", start: str = "mean") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(final logits, logits per step) for a chain of label denoisers, or for a plain classifier (one step), batched."""
    plain = isinstance(model.blocks[0], ViTClassifier)
    finals, per_step = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        logits = [model.blocks[0].logits(x)] if plain else chain_logits(model, x, steps, grid, sampler=sampler,
                                                                                  start=start)
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
                        seed: int = 0, sampler: str | None = None, start: str | None = None) -> dict[str, Any]:
    """Held-out accuracy (top-1, top-5 where there are more than 5 classes), per-step chain accuracy and the
    oracle accuracy of each block at the noise levels of its own inference steps."""
    model, cfg = from_pretrained(run_dir, device)
    data = load_image_data(cfg.data, cfg.model.image_size, cfg.model.in_channels).test
    K = cfg.model.num_classes
    steps = steps or cfg.sample.steps or cfg.blocks.num_blocks
    sampler, start = sampler or cfg.sample.sampler, start or cfg.sample.start
    t0 = time.perf_counter()
    logits, per_step = predict_logits(model, data.images, steps if cfg.model.mode == "diffusion" else None,
                                      device=device, sampler=sampler, grid=cfg.sample.grid, start=start)
    infer_s = time.perf_counter() - t0
    r: dict[str, Any] = {"run": str(run_dir), "num_blocks": cfg.blocks.num_blocks, "mode": cfg.model.mode,
                         "num_test": len(data), "top1": topk_accuracy(logits, data.labels, 1),
                         "inference_s": infer_s}
    if K > 5:
        r["top5"] = topk_accuracy(logits, data.labels, 5)
    if cfg.model.mode == "diffusion":
        sigmas = sigma_grid(model.partition.axis, steps, cfg.sample.grid, partition=model.partition).tolist()[:-1]
        owners = model.partition.owner(torch.tensor(sigmas)).tolist()
        r["steps"], r["start"] = steps, start
        errors = [1 - topk_accuracy(l, data.labels, 1) for l in per_step]  # the chain's held-out error after each step
        r["decision"] = {"chance_error": 1 - 1 / K, "chain": decision_shares(1 - 1 / K, errors, owners)}
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
             + f"  (inference {r['inference_s']:.2f} s" + (f", chain from its {r['start']}" if "start" in r else "")
             + ")"]
    for row in r.get("per_step", []):
        lines.append(f"  step {row['step']} (sigma {row['sigma']:.3g}, block {row['block']}): chain accuracy "
                     f"{row['chain_accuracy']:.4f}")
    for b in r.get("per_block", []):
        lines.append(f"  block {b['block']}: oracle accuracy {b['oracle_accuracy']:.4f}, chain "
                     f"{b['chain_accuracy']:.4f} (gap {b['composition_gap']:+.4f})")
    if "decision" in r:
        lines.append(f"  who decides (each block's share of the held-out error its steps remove from chance's "
                     f"{r['decision']['chance_error']:.2f}): {shares_text(r['decision']['chain'])}")
    return "\n".join(lines)


# ---- compare


def write_classification_report(out_dir: Path, configs: dict[int, RunConfig], results: dict[int, dict]) -> None:
    """compare's report.md for classifiers: accuracy, per-step chain accuracy and oracle accuracy per block."""
    c1, cfg = configs[1], configs[max(configs)]
    top5 = c1.model.num_classes > 5
    header = ["B", "layers per block", "top-1", *(["top-5"] if top5 else []), "train s", "ms/step per block",
              "inference s", "peak train mem MiB"]
    lines = [f"# End-to-end ViT vs DiffusionBlocks classification: {c1.data.dataset}", "",
             equal_compute(c1, "ViT (B=1, a plain classifier with the same layers)") + ". "
             f"ViT: {c1.model.depth} layers, width {c1.model.hidden_size}; label embedding "
             f"{cfg.classify.label_embedding}; {cfg.train.schedule} schedule; inference: "
             f"{cfg.sample.steps or 'B'} steps. Held-out images: {results[1]['num_test']}.", ""]
    lines += markdown_table(header, [{"B": str(B), "top-1": f"{r['top1']:.4f}", "top-5": f"{r.get('top5', 0):.4f}",
                                      "inference s": f"{r['inference_s']:.2f}", **training_cost(configs[B], r)}
                                     for B, r in results.items()])
    lines += ["", "## Chain diagnostics", "", "Accuracy after each block's step along the chain, next to the block's "
              "accuracy on its own training distribution (true label embedding + sigma eps) at the same noise levels.",
              "", "| B | block | steps | sigma range | oracle acc. | chain acc. | gap |", "|---|---|---|---|---|---|---|"]
    for B, r in results.items():
        for b in r.get("per_block", []):
            lo, hi = b["sigma_range"]
            lines.append(f"| {B} | {b['block']} | {b['steps']} | {lo:.3g}-{hi:.3g} | {b['oracle_accuracy']:.4f} | "
                         f"{b['chain_accuracy']:.4f} | {b['composition_gap']:+.4f} |")
    decided = {B: r["decision"] for B, r in results.items() if "decision" in r}
    if decided:
        lines += ["", "Who decides: each block's share of the held-out error its steps remove from chance's (1 - 1/K)."
                  "", ""]
        lines += markdown_table(["B", "shares"], [{"B": str(B), "shares": shares_text(d["chain"])}
                                                  for B, d in decided.items()])
    lines += ["", memory_note(results[1])]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    _plot_classifier_comparison(out_dir, results)


def _plot_classifier_comparison(out_dir: Path, results: dict[int, dict]) -> None:
    Bs = list(results)
    fig = Figure(figsize=(9, 3.2))
    axes = fig.subplots(1, 2)
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
