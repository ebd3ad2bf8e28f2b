"""Latent diffusion: images encoded once by a diffusers AutoencoderKL into cached latents, decoded for pictures.

`data.vae` names a local directory written by `AutoencoderKL.save_pretrained`. The train and held-out images are
encoded once, in batches, into latents z = (mu - shift_factor) * scaling_factor (the posterior mean mu, or with
`data.vae_latent="sample"` one seeded draw mu + std * eps per image), with the scaling and shift factors of the
VAE's config. The latents are cached in a safetensors file keyed by the VAE's files' sha256 and the images'
fingerprint, so resumed, fine-tuned, composed and evaluated runs read the same tensors, and a different VAE never
reuses another's latents. The blocks train on the latents as on images; samples are decoded back to pixels,
x = decode(z / scaling_factor + shift_factor).

The VAE is never trained, and is not held while the blocks train: only the cached latents are.
A run records the VAE its blocks were trained in (`latents.json`: path and sha256); the run's later commands and
the runs made from it refuse another VAE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import extras
from .config import ConfigError, check_choice, shown_path
from .data import DataConfig, ImageData, ImageSplits, load_image_data
from .reference import data_fingerprint
from .seeding import make_generator

log = logging.getLogger(__name__)

CACHE_FORMAT = "diffusionblocks-latents/1"
RUN_FILE = "latents.json"          # A run's record of the VAE its blocks were trained in.
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class LatentDataConfig(DataConfig):
    """The image dataset of image generation, optionally encoded into the latents of a VAE (latent diffusion)."""

    vae: str | None = None           # Directory of a diffusers AutoencoderKL (save_pretrained): train on its latents.
    vae_latent: str = "mean"         # What is cached of each image's posterior: "mean", or "sample" (one seeded draw).
    vae_batch_size: int = 64         # Images per batch when encoding and decoding.
    latent_cache: str | None = None  # Directory of the cached latents (default: the cache dir's latents/).

    def validate(self) -> None:
        super().validate()
        check_choice("data.vae_latent", self.vae_latent, ("mean", "sample"))
        if self.vae_batch_size < 1:
            raise ConfigError(f"data.vae_batch_size must be at least 1, got {self.vae_batch_size}")
        if self.vae is not None and (self.hflip or self.crop_padding):
            raise ConfigError("data.hflip and data.crop_padding act on pixels, but with data.vae the blocks train on "
                              "latents encoded once: set them to false and 0")


def default_cache_dir() -> Path:
    """Where reference classifiers and latents are cached: $DIFFUSIONBLOCKS_CACHE, else ~/.cache/diffusionblocks."""
    env = os.environ.get("DIFFUSIONBLOCKS_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffusionblocks"


def vae_sha256(path: Path) -> str:
    """sha256 of a VAE directory's config.json and weight files (names and bytes, in name order)."""
    digest = hashlib.sha256()
    files = [path / "config.json", *sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)]
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class LatentSpace:
    """A frozen AutoencoderKL and its scaling: images (N, C, H, W in [-1, 1]) <-> latents (N, c, H / f, W / f)."""

    def __init__(self, vae, path: Path, sha256: str, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.path, self.sha256, self.device, self.batch_size = path, sha256, torch.device(device), batch_size
        c = vae.config
        self.scaling_factor = float(c.scaling_factor)
        self.shift_factor = float(getattr(c, "shift_factor", None) or 0.0)
        self.in_channels = int(c.in_channels)
        self.latent_channels = int(c.latent_channels)
        self.downsample = 2 ** (len(c.block_out_channels) - 1)  # f: one halving per down block but the last

    def latent_size(self, image_size: int) -> int:
        return image_size // self.downsample

    @torch.no_grad()
    def encode(self, images: torch.Tensor, noise: torch.Tensor | None = None, progress: bool | None = False
               ) -> torch.Tensor:
        """z = (mu - shift) * scale, or (mu + std * noise - shift) * scale with noise (N, c, h, w); in batches.
        progress: a bar; None: a bar on a terminal only."""
        out = []
        for i in tqdm(range(0, len(images), self.batch_size), desc="encoding images", unit="batch",
                      disable=None if progress is None else not progress):
            posterior = self.vae.encode(images[i:i + self.batch_size].to(self.device)).latent_dist
            z = posterior.mean
            if noise is not None:
                z = z + posterior.std * noise[i:i + self.batch_size].to(self.device)
            out.append(((z - self.shift_factor) * self.scaling_factor).float().cpu())
        return torch.cat(out).contiguous()  # the mean is a view of the moments: training must read the same
        # layout whether the latents were just encoded or read from the cache

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """x = decode(z / scale + shift), in batches; float32 on the CPU, not clamped."""
        out = []
        for i in range(0, len(latents), self.batch_size):
            z = latents[i:i + self.batch_size].to(self.device, torch.float32)
            out.append(self.vae.decode(z / self.scaling_factor + self.shift_factor).sample.float().cpu())
        return torch.cat(out)


def vae_class(path: Path) -> str | None:
    """The `_class_name` of a model directory's config.json (None when it has none)."""
    try:
        return json.loads((path / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"data.vae: cannot read {shown_path(path / 'config.json')}: {e}") from None


def load_vae(vae: str, device: str | torch.device = "cpu", batch_size: int = 64) -> LatentSpace:
    """The AutoencoderKL in directory `vae` (written by save_pretrained); one ConfigError for what is wrong."""
    path = Path(vae).expanduser()
    if not path.is_dir():
        raise ConfigError(f"data.vae={shown_path(path)} is not a directory")
    if not (path / "config.json").is_file():
        raise ConfigError(f"data.vae={shown_path(path)} has no config.json: name a directory written by "
                          "AutoencoderKL.save_pretrained")
    name = vae_class(path)
    if name != "AutoencoderKL":
        raise ConfigError(f"data.vae={shown_path(path)} holds a {name or 'model of no class'} "
                          "(config.json's _class_name), not an AutoencoderKL")
    AutoencoderKL = extras.load("diffusers", "data.vae").AutoencoderKL
    try:
        model = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as e:
        raise ConfigError(f"data.vae={shown_path(path)}: cannot load the AutoencoderKL: {' '.join(str(e).split())}"
                          ) from None
    return LatentSpace(model, path, vae_sha256(path), device, batch_size)


def compute_device(device: str | torch.device | None = None) -> torch.device:
    """Where to compute (encode latents, train a judge): the given device, else CUDA when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_shapes(space: LatentSpace, data: DataConfig, channels: int, image_size: int, model_channels: int,
                 model_size: int) -> None:
    """The images fit the VAE, and the VAE's latents fit the model (model.in_channels, model.image_size)."""
    where = f"data.vae={shown_path(space.path)}"
    if channels != space.in_channels:
        raise ConfigError(f"data.dataset={data.dataset!r} has {channels}-channel images but the VAE at {where} "
                          f"encodes {space.in_channels}-channel images")
    if image_size % space.downsample:
        raise ConfigError(f"data.dataset={data.dataset!r} has {image_size}x{image_size} images, not a multiple of "
                          f"the VAE's downsampling factor {space.downsample} ({where})")
    if space.latent_channels != model_channels:
        raise ConfigError(f"the VAE at {where} has {space.latent_channels} latent channels but "
                          f"model.in_channels={model_channels}: set model.in_channels={space.latent_channels}")
    h = space.latent_size(image_size)
    if h != model_size:
        raise ConfigError(f"the VAE at {where} makes {h}x{h} latents of the {image_size}x{image_size} images "
                          f"(factor {space.downsample}) but model.image_size={model_size}: set model.image_size={h}")


# ---- the cache


def cache_path(data: LatentDataConfig, pixels: ImageSplits, sha256: str) -> Path:
    """latents-<dataset>-<vae sha[:16]>-<images' fingerprint[:16]>-<mean|sample>.safetensors in the cache dir."""
    fingerprint = hashlib.sha256((data_fingerprint(pixels.train) + data_fingerprint(pixels.test)).encode()).hexdigest()
    folder = Path(data.latent_cache).expanduser() if data.latent_cache else default_cache_dir() / "latents"
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in data.dataset)
    return folder / f"latents-{safe}-{sha256[:16]}-{fingerprint[:16]}-{data.vae_latent}.safetensors"


def _read_cache(path: Path, meta: dict[str, str]) -> dict[str, torch.Tensor] | None:
    """The cached latents, None when the file is stale or unreadable (it is then encoded again); ConfigError when
    the file is not a latents cache (it is the user's, and never overwritten)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            found = f.metadata() or {}
    except (OSError, SafetensorError) as e:
        log.warning("latent cache %s is unreadable (%s); encoding again", path, e)
        return None
    if found.get("format") != CACHE_FORMAT:
        raise ConfigError(f"{shown_path(path)} is not a latents cache file (metadata format "
                          f"{found.get('format')!r}): move it, or set data.latent_cache to another directory")
    stale = [k for k, v in meta.items() if found.get(k) != v]
    if stale:
        log.warning("latent cache %s does not match (%s); encoding again", path, ", ".join(stale))
        return None
    return load_file(str(path))


def _write_cache(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Writes the cache atomically (a temporary file in the same directory, then a rename)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write the latent cache %s: %s", path, e)
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def encode_splits(space: LatentSpace, data: LatentDataConfig, pixels: ImageSplits,
                  progress: bool | None = None) -> tuple[ImageSplits, dict[str, Any]]:
    """The latents of the train and held-out images, from the cache or encoded (and cached) now; and where."""
    path = cache_path(data, pixels, space.sha256)
    meta = {"format": CACHE_FORMAT, "vae_sha256": space.sha256, "vae_latent": data.vae_latent,
            "train_fingerprint": data_fingerprint(pixels.train), "test_fingerprint": data_fingerprint(pixels.test)}
    tensors = _read_cache(path, meta) if path.is_file() else None
    cached = tensors is not None
    if tensors is None:
        log.info("encoding %d + %d images with the VAE at %s into %s", len(pixels.train), len(pixels.test),
                 space.path, path)
        tensors = {}
        for split, images in (("train", pixels.train.images), ("test", pixels.test.images)):
            noise = None
            if data.vae_latent == "sample":  # one draw per image, from a stream of its own per split
                h = space.latent_size(images.shape[-1])
                noise = torch.randn((len(images), space.latent_channels, h, h),
                                    generator=make_generator(0, "vae-posterior", split))
            tensors[split] = space.encode(images, noise, progress=progress)
        _write_cache(path, tensors, meta)
    splits = ImageSplits(*(ImageData(tensors[k], s.labels, s.num_classes, f"{s.name}-latents", s.classes)
                           for k, s in (("train", pixels.train), ("test", pixels.test))))
    return splits, {"path": str(path), "cached": cached}


# ---- a run's latents


def load_latents(data: LatentDataConfig, model_channels: int, model_size: int,
                 device: str | torch.device | None = None) -> tuple[ImageSplits, LatentSpace]:
    """The dataset of `data`, encoded (or read from the cache) by its VAE, checked against the model's shape."""
    space = load_vae(data.vae, compute_device(device), data.vae_batch_size)
    pixels = load_image_data(data)
    check_shapes(space, data, pixels.train.num_channels, pixels.train.image_size, model_channels, model_size)
    splits, where = encode_splits(space, data, pixels)
    log.info("latents %s (%s): %d train, %d test of %s", where["path"], "cached" if where["cached"] else "encoded",
             len(splits.train), len(splits.test), "x".join(map(str, splits.train.images.shape[1:])))
    return splits, space


def record(run_dir: Path, data: LatentDataConfig, space: LatentSpace) -> None:
    """Writes the run's latents.json (the VAE its blocks are trained in), unless the run has one."""
    path = Path(run_dir) / RUN_FILE
    if path.exists():
        return
    info = {"vae": str(data.vae), "vae_sha256": space.sha256, "vae_latent": data.vae_latent,
            "scaling_factor": space.scaling_factor, "shift_factor": space.shift_factor,
            "latent_channels": space.latent_channels, "downsample": space.downsample}
    path.write_text(json.dumps(info, indent=2) + "\n")


def check_run(run_dir: Path, space: LatentSpace) -> None:
    """Refuses a VAE other than the one the run's blocks were trained in (its latents.json)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return
    recorded = json.loads(path.read_text())
    if recorded.get("vae_sha256") != space.sha256:
        raise ConfigError(f"data.vae={shown_path(space.path)} is not the VAE the blocks of {str(run_dir)!r} were "
                          f"trained in ({recorded.get('vae')!r}, sha256 {recorded.get('vae_sha256', '?')[:16]}..., "
                          f"not {space.sha256[:16]}...): set data.vae to that one")


def run_decoder(data: LatentDataConfig, run_dir: Path | None, device: str | torch.device
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The run's decoder of latents into pixel images, its VAE checked against the run's record."""
    space = load_vae(data.vae, device, data.vae_batch_size)
    if run_dir is not None:
        check_run(run_dir, space)
    return space.decode


__all__ = ["LatentDataConfig", "LatentSpace", "cache_path", "check_run", "check_shapes", "compute_device",
           "default_cache_dir", "encode_splits", "load_latents", "load_vae", "record", "run_decoder", "vae_sha256"]
