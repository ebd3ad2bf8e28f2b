"""Class-conditional image generation with DiT blocks (method.md section 5, first row): the main job.

Each block is an EDM denoiser around a DiT of the block's layers, with its own patch, noise and class
embedders and final layer. A block's loss is EDM's L2 on y + sigma eps, the label dropped to the null
class with probability model.class_dropout (for classifier-free guidance); noise.parameterization may
instead make each block a rectified-flow or DDPM network with its own loss and time (`parameterizations`).
Inference is any sampler of `sampling.py` over the chain of blocks; evaluation is `evaluation.py`'s
conditional accuracy, Frechet distance, KID and chain diagnostics.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from .. import extras
from ..config import ConfigError, ParameterizedNoiseConfig, RunConfig, TrainConfig, check_choice
from ..data import BatchSampler, ImageData, ImageSplits, load_image_data
from ..diagnostics import write_chain_diagnostics
from ..evaluation import evaluate_generator, format_evaluation
from ..generate import class_labels_evenly, generate
from ..latents import LatentDataConfig, check_run, load_latents, load_vae, record, run_decoder
from ..metrics import shares_text
from ..models import diffusers_dit
from ..models.dit import DiT
from ..models.layers import take_layers
from ..noise import GRIDS, NoiseAxis, Partition
from ..options import EvaluateOptions, SampleOptions, option
from ..parameterizations import denoiser, noise_axis, parameterization
from ..plotting import image_grid, save_image_grid
from ..precond import append_dims
from ..pretrained import from_pretrained
from ..report import equal_compute, markdown_table, memory_note, plot_loss_curves, training_cost
from ..rundir import save_text
from ..sampling import SAMPLERS
from .base import Evaluation, Task

logger = logging.getLogger(__name__)

CLASSES_FILE = "classes.json"  # a run's class names (image folders, Hugging Face datasets), id order


@dataclass(frozen=True)
class ImageModelConfig:
    """A transformer over image patches, the trunk of the DiT and ViT blocks."""

    arch: str = "dit"            # Block architecture: "dit" (image generation) or "vit" (classification).
    image_size: int = 8          # Height = width of the images, in pixels.
    in_channels: int = 1         # Image channels.
    patch_size: int = 2          # Side of a square patch; image_size must be a multiple.
    hidden_size: int = 128       # Transformer width.
    depth: int = 6               # L, the number of transformer layers of the whole (end-to-end) network.
    num_heads: int = 4           # Attention heads; hidden_size must be a multiple.
    mlp_ratio: float = 4.0       # MLP hidden width / hidden_size.
    num_classes: int = 10        # Classes (for generation, the conditioning: 0 = unconditional, and index
                                 # num_classes is the null class).

    def validate(self) -> None:
        for name in ("image_size", "in_channels", "patch_size", "hidden_size", "num_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.image_size={self.image_size} is not a multiple of "
                              f"model.patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not a multiple of "
                              f"model.num_heads={self.num_heads}")


@dataclass(frozen=True)
class DiTModelConfig(ImageModelConfig):
    class_dropout: float = 0.1   # Probability of replacing a training label by the null class (for guidance).
    pretrained: str | None = None  # arch "diffusers-dit": a model directory written by diffusers' save_pretrained
                                 # (config.json, and weights, which every block built afresh starts from).
    diffusers: dict[str, Any] | None = None  # arch "diffusers-dit": the DiTTransformer2DModel config (read from
                                 # model.pretrained when not given); our fields above agree with it or come from it.

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.class_dropout < 1:
            raise ConfigError(f"model.class_dropout must be in [0, 1), got {self.class_dropout}")
        if self.arch != "diffusers-dit":
            given = [name for name in ("pretrained", "diffusers") if getattr(self, name) is not None]
            if given:
                raise ConfigError(f"model.{given[0]} is for model.arch='diffusers-dit' (model.arch={self.arch!r})")
            return
        if self.diffusers is None:
            raise ConfigError("model.arch='diffusers-dit' needs the model's config: model.pretrained (a directory "
                              "written by save_pretrained) or model.diffusers (a DiTTransformer2DModel config)")
        ours = {name: getattr(self, name) for name in diffusers_dit.OUR_FIELDS}
        # A run converted with --init copy chains B whole models: model.depth is B x the model's layers.
        ours["depth"] = diffusers_dit.derived_fields(self.diffusers)["depth"] if self.copies_whole_model else self.depth
        message = diffusers_dit.disagreement(ours, self.diffusers)
        if message:
            raise ConfigError(message)

    @property
    def copies_whole_model(self) -> bool:
        """Whether model.depth counts several whole diffusers models (a run converted with --init copy)."""
        L = self.diffusers.get("num_layers") if self.diffusers else None
        return isinstance(L, int) and L > 0 and self.depth != L and self.depth % L == 0


@dataclass(frozen=True)
class SampleConfig:
    sampler: str = "euler"           # A name of sampling.SAMPLERS: "euler" (the paper's), "heun" (EDM Alg. 1)...
    steps: int = 50                  # Denoising steps (network evaluations per sample for Euler).
    grid: str = "quantile"           # A name of noise.GRIDS: "quantile" (equal mass, the paper's), "karras" (rho).
    rho: float = 7.0                 # Karras schedule exponent.
    guidance: float = 2.0            # Classifier-free guidance weight w; 1 = no guidance.
    samples_per_class: int = 10      # Columns of the sample grid written after training.

    def validate(self) -> None:
        check_choice("sample.sampler", self.sampler, tuple(SAMPLERS))
        check_choice("sample.grid", self.grid, tuple(GRIDS))
        if self.steps < 1:
            raise ConfigError(f"sample.steps must be at least 1, got {self.steps}")
        if self.guidance < 0:
            raise ConfigError(f"sample.guidance must be non-negative, got {self.guidance}")
        if self.rho <= 0:
            raise ConfigError(f"sample.rho must be positive, got {self.rho}")
        if self.samples_per_class < 1:
            raise ConfigError(f"sample.samples_per_class must be at least 1, got {self.samples_per_class}")


@dataclass(frozen=True)
class GenerationConfig(RunConfig):
    """The main job by default: a DiT of 6 layers of width 96 on the 8x8 digits, B=3, 800 steps of batch 64 per
    block, EMA half-life 100 steps (benchmarks/results/main-job-size)."""

    name: str = "digits-dit"
    task: str = "generate"
    model: DiTModelConfig = field(default_factory=lambda: DiTModelConfig(hidden_size=96))
    noise: ParameterizedNoiseConfig = field(default_factory=ParameterizedNoiseConfig)
    data: LatentDataConfig = field(default_factory=LatentDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps_per_block=800, batch_size=64, lr=2e-3,
                                                                   ema_halflife_steps=100.0))
    sample: SampleConfig = field(default_factory=SampleConfig)

    @classmethod
    def upgrade_config(cls, d: dict[str, Any]) -> dict[str, Any]:
        """Configs written before tasks had their own sections carried an unused "classify" section. A
        diffusers-dit model given as a directory gets its config read from it, and the model fields not given
        are taken from that config."""
        d = {k: v for k, v in d.items() if k != "classify"}
        m = d.get("model")
        if isinstance(m, dict) and m.get("arch") == "diffusers-dit":
            d["model"] = with_diffusers_fields(m)
        return d

    def validate(self) -> None:
        """The fields checked by section, then the rules across sections."""
        super().validate()
        check_choice("model.arch", self.model.arch, ("dit", "diffusers-dit"))
        if self.model.arch == "diffusers-dit" and self.model.copies_whole_model:
            L = self.model.diffusers["num_layers"]
            if self.layer_split() != (L,) * self.blocks.num_blocks:
                whole = [L] * (self.model.depth // L)
                raise ConfigError(f"model.depth={self.model.depth} is not the diffusers model's num_layers={L}: "
                                  f"only a chain of whole models (blocks.layers_per_block={whole}, as convert "
                                  "--init copy writes) may count more layers")


def with_diffusers_fields(m: dict[str, Any]) -> dict[str, Any]:
    """A diffusers-dit model section with model.diffusers read from model.pretrained when not given, and the model
    fields it leaves out taken from model.diffusers (diffusers not installed: unchanged, for validate to say so)."""
    if not extras.installed("diffusers"):
        return m
    m = dict(m)
    if m.get("diffusers") is None and isinstance(m.get("pretrained"), str):
        m["diffusers"] = diffusers_dit.read_pretrained_config(m["pretrained"])
    if isinstance(m.get("diffusers"), dict):
        for name, value in diffusers_dit.derived_fields(m["diffusers"]).items():
            m.setdefault(name, value)
    return m


def source_layers(cfg: GenerationConfig, b: int) -> tuple[int, int]:
    """The layers [first, last) of the diffusers model that block b is made of: its share of the layer split, or,
    in a chain of whole models (convert --init copy), all of them."""
    if cfg.model.copies_whole_model:
        return 0, cfg.model.diffusers["num_layers"]
    split = cfg.layer_split()
    return sum(split[:b]), sum(split[:b + 1])


def diffusers_block(cfg: GenerationConfig, b: int, generator: torch.Generator | None) -> diffusers_dit.DiffusersDiT:
    """Block b's diffusers DiT: transformer blocks of its layers, initialised from `generator`, then, for a fresh
    block (a generator given) when model.pretrained holds weights, set to those layers of the pretrained model (with
    copies of its embedding and head). A block built to load a run's checkpoint does not read the directory."""
    m = cfg.model
    first, last = source_layers(cfg, b)
    # EDM's Denoiser hands the network c_noise; DDPM's and flow's hand it their timestep, diffusers' own input.
    noise_input = "edm" if parameterization(cfg.noise) == "edm" else "timestep"
    net = diffusers_dit.DiffusersDiT(m.diffusers, cfg.layer_split()[b], has_first_layer=first == 0,
                                     noise_input=noise_input)
    net.initialize_weights(generator)
    if generator is not None and m.pretrained is not None and diffusers_dit.has_weights(m.pretrained):
        weights = diffusers_dit.split_state_dict(diffusers_dit.load_pretrained_weights(m.pretrained), first, last)
        missing, unexpected = net.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ConfigError(f"model.pretrained={m.pretrained!r} does not hold the weights of model.diffusers: "
                              f"{'missing ' + missing[0] if missing else 'unexpected ' + unexpected[0]}")
    return net


# ---- shared by the image tasks


def load_matching_images(cfg: RunConfig, conditional_ok: bool) -> ImageSplits:
    """The run's image dataset, checked against the model's image shape and classes.

    conditional_ok: model.num_classes may also be 0 (an unconditional generator).
    """
    m = cfg.model
    data = load_image_data(cfg.data, m.image_size, m.in_channels)
    C, H = data.train.num_channels, data.train.image_size
    if (C, H) != (m.in_channels, m.image_size):
        raise ConfigError(f"data.dataset={cfg.data.dataset!r} has {C}-channel {H}x{H} images but the model expects "
                          f"model.in_channels={m.in_channels}, model.image_size={m.image_size}")
    if m.num_classes not in ((0, data.train.num_classes) if conditional_ok else (data.train.num_classes,)):
        raise ConfigError(f"data.dataset={cfg.data.dataset!r} has {data.train.num_classes} classes "
                          f"but model.num_classes={m.num_classes}")
    return data


def write_classes(run_dir: Path, data: ImageSplits) -> None:
    """classes.json: the name of each class id, where the dataset names its classes (an image folder's
    subfolders, a Hugging Face dataset's labels)."""
    if data.train.classes:
        save_text(Path(run_dir) / CLASSES_FILE, json.dumps(list(data.train.classes), ensure_ascii=False) + "\n")


def image_batch_sampler(cfg: RunConfig, data: ImageData, b: int) -> BatchSampler:
    """Block b's (images, labels) batches, with the config's flips and crops."""
    return BatchSampler(data, cfg.train.batch_size, seed=cfg.train.seed, stream=b, hflip=cfg.data.hflip,
                        crop_padding=cfg.data.crop_padding)


def per_class_grid(images: torch.Tensor, num_classes: int, columns: int) -> torch.Tensor | None:
    """The first `columns` samples of each class, class by class, from samples in contiguous runs per class
    (`class_labels_evenly`); None when the classes do not split them evenly."""
    per_class = len(images) // num_classes if num_classes else 0
    if per_class < 1 or len(images) % num_classes:
        return None
    return images.view(num_classes, per_class, *images.shape[1:])[:, :columns].flatten(0, 1)  # (K * cols, C, H, W)


@dataclass(frozen=True)
class ImageSampleOptions(SampleOptions):
    class_: int | None = option(None, "class of every sample (default: classes covered evenly)", metavar="CLASS")
    steps: int | None = option(None, "denoising steps (default: the run's sample.steps)")
    sampler: str | None = option(None, "default: the run's sample.sampler", choices=tuple(SAMPLERS))
    grid: str | None = option(None, "sigma grid (default: the run's sample.grid)", choices=tuple(GRIDS))
    guidance: float | None = option(None, "classifier-free guidance weight (default: the run's)")


@dataclass(frozen=True)
class ImageEvaluateOptions(EvaluateOptions):
    steps: int | None = option(None, "denoising steps (default: the run's sample.steps)")
    sampler: str | None = option(None, "default: the run's sample.sampler", choices=tuple(SAMPLERS))
    grid: str | None = option(None, "sigma grid (default: the run's sample.grid)", choices=tuple(GRIDS))
    guidance: float | None = option(None, "classifier-free guidance weight (default: the run's)")
    diagnostics: bool = option(True, "skip the chain diagnostics")


def steps_option(steps: int | None, default: int) -> int:
    """--steps, or the run's `default` when not given: at least 1."""
    steps = default if steps is None else steps
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    return steps


# ---- the task


class ImageGenerationTask(Task):
    name = "generate"
    config_class = GenerationConfig
    sample_suffixes = (".png", ".npz")
    sample_options = ImageSampleOptions
    evaluate_options = ImageEvaluateOptions

    def load_data(self, cfg: RunConfig) -> ImageSplits:
        if cfg.data.vae is None:
            return load_matching_images(cfg, conditional_ok=True)
        return _latents(cfg)[0]

    # ---- latent diffusion (data.vae): the blocks train on cached latents; their samples are decoded

    def load_run_data(self, cfg: RunConfig, run_dir: Path) -> ImageSplits:
        """The data, and for a latent run the VAE checked against the one the run's blocks were trained in."""
        if cfg.data.vae is None:
            return self.load_data(cfg)
        latents, space = _latents(cfg)
        check_run(run_dir, space)
        return latents

    def prepare_run(self, cfg: RunConfig, run_dir: Path, data: ImageSplits) -> None:
        """classes.json where the dataset names its classes; a latent run records its VAE (latents.json)."""
        write_classes(run_dir, data)
        if cfg.data.vae is not None:
            record(run_dir, cfg.data, load_vae(cfg.data.vae, batch_size=cfg.data.vae_batch_size))

    def batch_sampler(self, cfg: RunConfig, data: ImageData, b: int) -> BatchSampler:
        return image_batch_sampler(cfg, data, b)

    def noise_axis(self, cfg: RunConfig) -> NoiseAxis:
        """The axis of noise.parameterization: EDM's sigma, rectified flow's t or DDPM's timesteps, read as sigma."""
        return noise_axis(cfg.noise)

    def remaining_measure(self, cfg: RunConfig) -> str | None:
        """The denoising error at each sigma (EDM's loss without its weight; the other parameterizations' losses
        are not measured yet)."""
        return "mmse" if cfg.noise.parameterization == "edm" else None

    def build_block(self, cfg: RunConfig, b: int, generator: torch.Generator | None = None) -> torch.nn.Module:
        """A DiT of block b's layers in the denoiser of noise.parameterization (EDM's by default), advertising its
        training range of sigma."""
        m = cfg.model
        if m.arch == "diffusers-dit":
            net = diffusers_block(cfg, b, generator)
        else:
            net = DiT(image_size=m.image_size, in_channels=m.in_channels, patch_size=m.patch_size,
                      hidden_size=m.hidden_size, depth=cfg.layer_split()[b], num_heads=m.num_heads,
                      mlp_ratio=m.mlp_ratio, num_classes=m.num_classes)
            net.initialize_weights(generator)
        lo, hi = self.partition(cfg).training_range(b)
        return denoiser(cfg.noise, net, lo, hi)

    def loss_inputs(self, cfg: RunConfig, partition: Partition, b: int, batch: tuple[torch.Tensor, torch.Tensor],
                    generator: torch.Generator) -> dict[str, Any]:
        """The image y is denoised, conditioned on its label (dropped to the null class with probability
        model.class_dropout)."""
        images, labels = batch
        n = images.shape[0]
        at = generator.device  # every draw where the generator is (the device, when the data is resident there)
        sigma = partition.sample(b, n, generator=generator, device=at).float()
        noise = torch.randn(images.shape, generator=generator, device=at)
        inputs = {"y": images, "sigma": sigma, "noise": noise}
        if cfg.model.num_classes > 0:
            drop = torch.rand(n, generator=generator, device=at) < cfg.model.class_dropout
            inputs["class_labels"] = torch.where(drop, cfg.model.num_classes, labels)
        return inputs

    # ---- blocks from a trained model

    def split_weights(self, cfg: RunConfig, weights: dict[str, torch.Tensor], first: int,
                      last: int) -> dict[str, torch.Tensor]:
        """DiT layers [first, last), with copies of the patch, noise and class embedders and the final layer (for
        diffusers' DiT: its transformer blocks, patch embedding and head, and layer 0's embedding for the head)."""
        if cfg.model.arch == "diffusers-dit":
            return diffusers_dit.split_state_dict(weights, first, last, prefix="inner_model.")
        return take_layers(weights, first, last)

    def pretrained(self, cfg: RunConfig) -> str | None:
        """model.pretrained, when it holds weights (model.arch='diffusers-dit')."""
        m = cfg.model
        return m.pretrained if m.pretrained is not None and diffusers_dit.has_weights(m.pretrained) else None

    def distills(self, cfg: RunConfig) -> bool:
        return True

    def distillation_inputs(self, cfg: RunConfig, teacher: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """The teacher's D(z, sigma | label) at the block's own z = y + sigma eps (the label as the block sees it),
        for the block's loss (any parameterization's: each reads the teacher's D as its own target)."""
        at = next(teacher.parameters()).device
        y, sigma = inputs["y"].float(), inputs["sigma"].float()
        z = y + append_dims(sigma, y.ndim) * inputs["noise"]
        cond = {"class_labels": inputs["class_labels"].to(at)} if "class_labels" in inputs else {}
        D_teacher = teacher(z.to(at), sigma.to(at), **cond).to(y.device)
        return {"D_teacher": D_teacher, "distill_weight": cfg.train.distill_weight}

    # ---- after training

    def after_training(self, cfg: RunConfig, run_dir: Path, device: torch.device) -> dict[str, Any]:
        """samples.png: one row per class, sample.samples_per_class columns."""
        model, _ = from_pretrained(run_dir, device)
        m, s = cfg.model, cfg.sample
        k = max(m.num_classes, 1)
        labels = class_labels_evenly(k * s.samples_per_class, k)
        images = generate(model, labels, image_shape=(m.in_channels, m.image_size, m.image_size),
                          num_classes=m.num_classes, steps=s.steps, sampler=s.sampler, guidance=s.guidance,
                          grid=s.grid, rho=s.rho, seed=cfg.train.seed, device=device,
                          decode=_decoder(cfg, run_dir, device))
        save_image_grid(images, run_dir / "samples.png", nrow=s.samples_per_class)
        logger.info("samples.png: one row per class")
        return {}

    def sample(self, run_dir: Path, model: torch.nn.Module, cfg: RunConfig, options: ImageSampleOptions) -> None:
        """A .png grid, or an .npz of images (N, C, H, W in [-1, 1]) and labels."""
        m, s = cfg.model, cfg.sample
        steps = steps_option(options.steps, s.steps)
        guidance = guidance_option(options.guidance, s.guidance)
        if options.class_ is not None:
            if m.num_classes == 0:
                raise ConfigError("--class given but the model is unconditional (model.num_classes=0)")
            if not 0 <= options.class_ < m.num_classes:
                raise ConfigError(f"--class {options.class_} is out of range: the model has classes "
                                  f"0..{m.num_classes - 1}")
            labels = torch.full((options.num,), options.class_, dtype=torch.long)
        else:
            labels = class_labels_evenly(options.num, max(m.num_classes, 1))
        images = generate(model, labels, image_shape=(m.in_channels, m.image_size, m.image_size),
                          num_classes=m.num_classes, steps=steps, sampler=options.sampler or s.sampler,
                          guidance=guidance, grid=options.grid or s.grid, rho=s.rho, seed=options.seed,
                          device=options.device, progress=options.progress,
                          decode=_decoder(cfg, run_dir, options.device))
        out = Path(options.out)
        if out.suffix.lower() == ".npz":
            np.savez(out, images=images.numpy().astype(np.float32), labels=labels.numpy().astype(np.int64))
        else:
            k = max(m.num_classes, 1)
            nrow = options.num // k if options.class_ is None and options.num % k == 0 else min(options.num, 10)
            save_image_grid(images, out, nrow=max(nrow, 1))

    def _settings(self, cfg: RunConfig, options: ImageEvaluateOptions) -> tuple[int, str, float]:
        s = cfg.sample
        return (steps_option(options.steps, s.steps), options.sampler or s.sampler,
                guidance_option(options.guidance, s.guidance))

    def evaluate(self, run_dir: Path, options: ImageEvaluateOptions) -> Evaluation:
        """Conditional accuracy, FD and KID with their real-vs-real floors, and the chain diagnostics."""
        if options.num < 2:
            raise ConfigError(f"--num must be at least 2, got {options.num}")
        model, cfg = from_pretrained(run_dir, options.device)
        steps, sampler, guidance = self._settings(cfg, options)
        result, images = evaluate_generator(model, cfg, run_dir, num_samples=options.num, steps=steps, sampler=sampler,
                                            guidance=guidance, grid=options.grid, seed=options.seed,
                                            diagnostics=options.diagnostics, device=options.device,
                                            cache_dir=options.cache_dir, progress=options.progress,
                                            latent=_latent_evaluation(cfg, run_dir, options.device))
        return Evaluation(result, images)

    def evaluation_name(self, cfg: RunConfig, options: ImageEvaluateOptions) -> str:
        steps, sampler, guidance = self._settings(cfg, options)
        return f"eval-{sampler}-{steps}steps-w{guidance:g}-n{options.num}-seed{options.seed}"

    def format_evaluation(self, result: dict[str, Any]) -> str:
        return format_evaluation(result)

    def write_evaluation(self, out_dir: Path, cfg: RunConfig, evaluation: Evaluation) -> None:
        """chain_diagnostics.json and .png, and samples.png (up to 10 per class, one row per class)."""
        result, images = evaluation.result, evaluation.artifacts
        if "chain" in result:
            write_chain_diagnostics(result["chain"], out_dir, title=f"{cfg.name}: oracle vs chain")
        grid = per_class_grid(images, cfg.model.num_classes, 10)
        if grid is not None:
            save_image_grid(grid, out_dir / "samples.png", nrow=min(len(images) // cfg.model.num_classes, 10))

    def write_comparison(self, out_dir: Path, configs: dict[int, RunConfig], results: dict[int, dict[str, Any]],
                         artifacts: dict[int, Any]) -> None:
        grids = {}
        for B, images in artifacts.items():
            grid = per_class_grid(images, configs[B].model.num_classes, 8)
            grids[B] = grid if grid is not None else images[:80]
        write_generation_report(out_dir, configs, results, grids)


def write_generation_report(out_dir: Path, configs: dict[int, RunConfig], results: dict[int, dict], grids: dict) -> None:
    """compare's report.md for image generation, and the plots it links."""
    cfg1, r1 = configs[1], results[1]
    header = ["B", "layers per block", "cond. acc.", "FD", "KID", "train s", "job wall s", "ms/step per block",
              "sampling s", "peak train mem MiB"]
    lines = [f"# End-to-end vs DiffusionBlocks: {cfg1.data.dataset}", "",
             equal_compute(cfg1, "model (B=1)") + ", so every run evaluates the same number of layers. "
             f"Model: DiT, {cfg1.model.depth} layers, width {cfg1.model.hidden_size}; {cfg1.train.schedule} "
             "schedule. Samples: "
             f"{r1['num_samples']} class-conditional ({r1['sampler']}, {r1['steps']} steps, guidance {r1['guidance']}, "
             f"{r1['grid']} grid, seed {r1['seed']}); held-out real images: {r1['num_heldout']}.", ""]
    lines += markdown_table(header, [{"B": str(B), "cond. acc.": f"{r['conditional_accuracy']:.4f}",
                                      "FD": f"{r['fd']:.3f}", "KID": f"{r['kid']:.4f}",
                                      "sampling s": f"{r['sampling_s']:.2f}", **training_cost(configs[B], r)}
                                     for B, r in results.items()])
    lines += ["", f"Real-vs-real floor ({r1['num_real_floor']} real training images vs the held-out set): "
              f"FD {r1['fd_real_floor']:.3f}, KID {r1['kid_real_floor']:.4f}. Reference classifier: held-out accuracy "
              f"{r1['reference_classifier']['heldout_accuracy']:.4f} on {r1['reference_classifier']['num_heldout']} "
              "images." + (f" VAE reconstruction floor (the same real images encoded and decoded by {r1['vae']}): FD "
                           f"{r1['fd_vae_floor']:.3f}, KID {r1['kid_vae_floor']:.4f}." if "fd_vae_floor" in r1 else ""),
              "",
              memory_note(r1) + " Sampling time: all samples, the same number of steps for every B (each step runs "
              "one block's layers).",
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
    decided = {B: r["chain"]["decision"] for B, r in results.items() if "decision" in r["chain"]}
    if decided:
        lines += ["", "Who decides: each block's share of the classifier's error its steps remove from chance, along the "
                  "chain and on the oracle input, and of the information to reveal (the oracle's denoising error "
                  "integrated over ln sigma).", ""]
        lines += markdown_table(["B", "along the chain", "on the oracle input", "information"], [
            {"B": str(B), "along the chain": shares_text(d["chain"]), "on the oracle input": shares_text(d["oracle"]),
             "information": shares_text(d["information"])} for B, d in decided.items()])
    lines += ["", "![metrics vs B](metrics_vs_B.png)", "", "![loss curves](loss_curves.png)", "",
              "![samples](samples_side_by_side.png)", "", "![chain](chain_gap.png)", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    _plot_comparison(out_dir, configs, results, grids)


def _plot_comparison(out_dir: Path, configs: dict[int, RunConfig], results: dict[int, dict], grids: dict) -> None:
    Bs = list(configs)
    r1 = results[1]
    fig = Figure(figsize=(11, 3.2))
    axes = fig.subplots(1, 3)
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

    plot_loss_curves(out_dir, configs)

    fig = Figure(figsize=(3.2 * len(Bs), 3.6))
    axes = fig.subplots(1, len(Bs), squeeze=False)
    for ax, B in zip(axes[0], Bs):
        g = image_grid(grids[B], nrow=8)
        ax.imshow(g[..., 0] if g.shape[-1] == 1 else g, cmap="gray", interpolation="nearest")
        ax.set_title(f"B={B}: acc {results[B]['conditional_accuracy']:.3f}, FD {results[B]['fd']:.2f}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_dir / "samples_side_by_side.png", dpi=110)

    fig = Figure(figsize=(8, 3.4))
    ax = fig.subplots()
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


def _latents(cfg: RunConfig, device: str | torch.device | None = None):
    """(The run's latents, its LatentSpace), checked against the model's shape and classes."""
    m = cfg.model
    latents, space = load_latents(cfg.data, m.in_channels, m.image_size, device)
    if m.num_classes not in (0, latents.train.num_classes):
        raise ConfigError(f"data.dataset={cfg.data.dataset!r} has {latents.train.num_classes} classes "
                          f"but model.num_classes={m.num_classes}")
    return latents, space


def _decoder(cfg: RunConfig, run_dir: Path, device: str | torch.device):
    """None for a pixel run; for a latent run, its VAE's decoder."""
    return None if cfg.data.vae is None else run_decoder(cfg.data, run_dir, device)


def _latent_evaluation(cfg: RunConfig, run_dir: Path, device: str | torch.device):
    """None for a pixel run; for a latent run, (its VAE, its latents), for evaluate_generator."""
    if cfg.data.vae is None:
        return None
    latents, space = _latents(cfg, device)
    check_run(run_dir, space)
    return space, latents


def guidance_option(guidance: float | None, default: float) -> float:
    """--guidance, or the run's `default` when not given, held to the rule of sample.guidance: a finite number >= 0."""
    w = default if guidance is None else guidance
    if not (math.isfinite(w) and w >= 0):
        raise ConfigError(f"--guidance must be a finite number >= 0, got {w}")
    return w


__all__ = ["DiTModelConfig", "GenerationConfig", "ImageEvaluateOptions", "ImageGenerationTask", "ImageModelConfig",
           "ImageSampleOptions", "SampleConfig"]
