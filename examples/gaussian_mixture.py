"""A task defined outside diffusionblocks: 2-D points from a mixture of Gaussians, one MLP denoiser per block.

The data are K Gaussians of std `data.std` whose centres sit evenly on a circle of radius `data.radius`.
Each block is an EDM denoiser (diffusionblocks.precond.Denoiser) around a residual MLP of the block's
layers; the chained blocks sample with Euler over the quantile grid. The evaluation scores samples by
their log-likelihood under the true mixture (next to that of held-out real points), the fraction that
lands within 3 std of a centre, and how many modes get at least half their share.

Use it from this directory (the current directory is searched for "module:Class" task names):

    diffusionblocks train --config mixture.json
    diffusionblocks sample runs/00000-mixture-B3 --num 2000 --out points.png
    diffusionblocks evaluate runs/00000-mixture-B3
    diffusionblocks compare --config mixture.json --num-blocks 2,3

or from Python, after `diffusionblocks.tasks.register("mixture", MixtureTask)`. docs/extending.md walks
through this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from diffusionblocks.config import ConfigError, RunConfig
from diffusionblocks.noise import Partition, get_sigmas_quantile
from diffusionblocks.options import EvaluateOptions, SampleOptions, option
from diffusionblocks.precond import Denoiser
from diffusionblocks.pretrained import from_pretrained
from diffusionblocks.report import markdown_table, training_cost
from diffusionblocks.sampling import sample_euler
from diffusionblocks.seeding import make_generator
from diffusionblocks.tasks import Evaluation, Task

# ---- the config: the task's sections, and the RunConfig subclass that holds them


@dataclass(frozen=True)
class MixtureModel:
    hidden_size: int = 128       # Width of the residual MLP.
    depth: int = 6               # L, residual layers of the whole network (the blocks split them).


@dataclass(frozen=True)
class MixtureData:
    modes: int = 8               # K Gaussians, centres evenly on a circle.
    radius: float = 0.7          # Radius of that circle (0.7: per-coordinate std near sigma_data = 0.5).
    std: float = 0.04            # Std of each Gaussian.
    num_train: int = 20_000
    num_test: int = 2_000

    def validate(self) -> None:
        if self.modes < 1 or self.std <= 0 or self.num_train < 1 or self.num_test < 1:
            raise ConfigError("data needs modes >= 1, std > 0 and at least one training and one test point")


@dataclass(frozen=True)
class MixtureSample:
    steps: int = 50              # Euler steps over the quantile grid.
    num: int = 2_000             # Points drawn after training (samples.png).


@dataclass(frozen=True)
class MixtureConfig(RunConfig):
    name: str = "mixture"
    task: str = "gaussian_mixture:MixtureTask"
    model: MixtureModel = field(default_factory=MixtureModel)
    data: MixtureData = field(default_factory=MixtureData)
    sample: MixtureSample = field(default_factory=MixtureSample)


# ---- data and the network


@dataclass(frozen=True)
class Points:
    train: torch.Tensor          # (N, 2)
    test: torch.Tensor           # (M, 2)
    centres: torch.Tensor        # (K, 2)
    std: float


def make_points(d: MixtureData, seed: int) -> Points:
    angle = 2 * math.pi * torch.arange(d.modes, dtype=torch.float64) / d.modes
    centres = d.radius * torch.stack([angle.cos(), angle.sin()], 1)  # (K, 2)
    g = make_generator(seed, "mixture-data")
    n = d.num_train + d.num_test
    x = centres[torch.randint(d.modes, (n,), generator=g)] + d.std * torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = x.float()
    return Points(x[:d.num_train], x[d.num_train:], centres.float(), d.std)


class PointBatches:
    """Block b's batch of step s: indices drawn from (seed, b, s), whatever trained before."""

    def __init__(self, points: torch.Tensor, batch_size: int, seed: int, b: int):
        self.points, self.batch_size, self.seed, self.b = points, batch_size, seed, b

    def batch(self, step: int) -> torch.Tensor:
        g = make_generator(self.seed, self.b, step, "mixture-batch")
        return self.points[torch.randint(len(self.points), (self.batch_size,), generator=g)]


class ResidualMLP(nn.Module):
    """F(c_in z, c_noise): residual layers h + W2 silu(W1 (LN(h) + e(c_noise))); a zero output layer."""

    def __init__(self, hidden_size: int, depth: int):
        super().__init__()
        self.embed = nn.Linear(2, hidden_size)
        self.noise_embed = nn.Sequential(nn.Linear(1, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.norms = nn.ModuleList([nn.LayerNorm(hidden_size) for _ in range(depth)])
        self.mlps = nn.ModuleList([nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.SiLU(),
                                                 nn.Linear(2 * hidden_size, hidden_size)) for _ in range(depth)])
        self.out = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, 2))

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=generator)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.out[1].weight)  # the block starts as D = c_skip z

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        h, e = self.embed(x), self.noise_embed(c_noise[:, None])  # (N, H) each
        for norm, mlp in zip(self.norms, self.mlps):
            h = h + mlp(norm(h) + e)
        return self.out(h)


@torch.no_grad()
def sample_points(model: nn.Module, n: int, steps: int, seed: int, device: str | torch.device = "cpu",
                  progress: bool = False) -> torch.Tensor:
    """n points from a BlockwiseDenoiser: Euler over the quantile grid from sigma_max eps (seed, "mixture-sample")."""
    sigmas = get_sigmas_quantile(model.partition.axis, steps).to(device, torch.float32)
    x = torch.randn(n, 2, generator=make_generator(seed, "mixture-sample")).to(device) * sigmas[0]
    return sample_euler(model, x, sigmas, disable=not progress).cpu()


def mixture_log_density(x: torch.Tensor, centres: torch.Tensor, std: float) -> torch.Tensor:
    """log p(x) under the mixture, in nats, per point (N,)."""
    d2 = torch.cdist(x.double(), centres.double()).pow(2)  # (N, K)
    log_k = -d2 / (2 * std ** 2) - math.log(2 * math.pi * std ** 2) - math.log(len(centres))
    return torch.logsumexp(log_k, dim=1)


def save_scatter(points: torch.Tensor, path: Path, title: str = "") -> None:
    fig = Figure(figsize=(4, 4))
    ax = fig.subplots()
    ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5)
    ax.set_xlim(-1.2, 1.2)
    ax.set_ylim(-1.2, 1.2)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---- the options of `sample` and `evaluate`: each field is an option (`steps` is --steps), with its default and help


@dataclass(frozen=True)
class MixtureSampleOptions(SampleOptions):
    steps: int | None = option(None, "Euler steps (default: the run's sample.steps)")


@dataclass(frozen=True)
class MixtureEvaluateOptions(EvaluateOptions):
    steps: int | None = option(None, "Euler steps (default: the run's sample.steps)")


# ---- the task


class MixtureTask(Task):
    name = "gaussian_mixture:MixtureTask"
    config_class = MixtureConfig
    sample_suffixes = (".png", ".npz")
    sample_options = MixtureSampleOptions
    evaluate_options = MixtureEvaluateOptions

    def load_data(self, cfg: RunConfig) -> Points:
        return make_points(cfg.data, cfg.train.seed)

    def batch_sampler(self, cfg: RunConfig, data: torch.Tensor, b: int) -> PointBatches:
        return PointBatches(data, cfg.train.batch_size, cfg.train.seed, b)

    def build_block(self, cfg: RunConfig, b: int, generator: torch.Generator | None = None) -> Denoiser:
        net = ResidualMLP(cfg.model.hidden_size, cfg.layer_split()[b])
        net.initialize_weights(generator if generator is not None else torch.Generator())
        lo, hi = self.partition(cfg).training_range(b)
        return Denoiser(net, sigma_data=cfg.noise.sigma_data, sigma_min=lo, sigma_max=hi)

    def loss_inputs(self, cfg: RunConfig, partition: Partition, b: int, batch: torch.Tensor,
                    generator: torch.Generator) -> dict[str, Any]:
        at = generator.device  # draws where the generator is: the device, when the data lives there
        sigma = partition.sample(b, len(batch), generator=generator, device=at).float()
        return {"y": batch, "sigma": sigma, "noise": torch.randn(batch.shape, generator=generator, device=at)}

    def after_training(self, cfg: RunConfig, run_dir: Path, device: torch.device) -> dict[str, Any]:
        model, _ = from_pretrained(run_dir, device)
        points = sample_points(model, cfg.sample.num, cfg.sample.steps, cfg.train.seed, device)
        save_scatter(points, run_dir / "samples.png", f"{cfg.name}, B={cfg.blocks.num_blocks}")
        return {}

    def sample(self, run_dir: Path, model: nn.Module, cfg: RunConfig, options: MixtureSampleOptions) -> None:
        points = sample_points(model, options.num, options.steps or cfg.sample.steps, options.seed, options.device,
                               options.progress)
        if Path(options.out).suffix.lower() == ".npz":
            np.savez(options.out, points=points.numpy())
        else:
            save_scatter(points, Path(options.out), f"{options.num} samples")

    def evaluate(self, run_dir: Path, options: MixtureEvaluateOptions) -> Evaluation:
        model, cfg = from_pretrained(run_dir, options.device)
        data = self.load_data(cfg)
        x = sample_points(model, options.num, options.steps or cfg.sample.steps, options.seed, options.device)
        nearest = torch.cdist(x, data.centres).min(1)  # distance and index of the nearest centre
        share = torch.bincount(nearest.indices, minlength=len(data.centres)).double() / len(x)
        result = {"num_samples": len(x), "num_blocks": cfg.blocks.num_blocks,
                  "log_likelihood": float(mixture_log_density(x, data.centres, data.std).mean()),
                  "log_likelihood_real": float(mixture_log_density(data.test, data.centres, data.std).mean()),
                  "in_mode_fraction": float((nearest.values < 3 * data.std).double().mean()),
                  "modes_covered": int((share >= 0.5 / len(data.centres)).sum()), "num_modes": len(data.centres)}
        return Evaluation(result, x)

    def format_evaluation(self, r: dict[str, Any]) -> str:
        return (f"  log-likelihood {r['log_likelihood']:.3f} nats/point (held-out real points: "
                f"{r['log_likelihood_real']:.3f}); within 3 std of a centre: {r['in_mode_fraction']:.3f}; "
                f"modes covered {r['modes_covered']}/{r['num_modes']}  ({r['num_samples']} samples)")

    def write_evaluation(self, out_dir: Path, cfg: RunConfig, evaluation: Evaluation) -> None:
        save_scatter(evaluation.artifacts, out_dir / "samples.png", f"{cfg.name}, B={cfg.blocks.num_blocks}")

    def write_comparison(self, out_dir: Path, configs: dict[int, RunConfig], results: dict[int, dict[str, Any]],
                         artifacts: dict[int, Any]) -> None:
        header = ["B", "layers per block", "log-lik.", "in-mode", "modes", "train s", "ms/step per block"]
        lines = [f"# End-to-end vs DiffusionBlocks: mixture of {configs[1].data.modes} Gaussians", "",
                 f"Held-out real points: log-likelihood {results[1]['log_likelihood_real']:.3f} nats/point.", ""]
        lines += markdown_table(header, [{"B": str(B), "log-lik.": f"{r['log_likelihood']:.3f}",
                                          "in-mode": f"{r['in_mode_fraction']:.3f}",
                                          "modes": f"{r['modes_covered']}/{r['num_modes']}",
                                          **training_cost(configs[B], r)} for B, r in results.items()])
        (out_dir / "report.md").write_text("\n".join(lines) + "\n")
        for B, points in artifacts.items():
            save_scatter(points, out_dir / f"samples_B{B}.png", f"B={B}")
