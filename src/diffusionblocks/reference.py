"""An independent reference classifier for judging generated images.

The classifier is a small CNN trained on a dataset's training split, never on generated images.
It gives the *conditional accuracy* of a class-conditional generator (the fraction of samples that
it assigns to the requested class) and, through :meth:`ReferenceClassifier.features`, the
penultimate activations in which a Frechet distance can be measured.

Training is deterministic: initial weights come from ``make_generator(seed, "refclf", "init")``,
batches from a :class:`~diffusionblocks.data.BatchSampler` on stream :data:`CLASSIFIER_STREAM`, and
the random shifts of each step from ``make_generator(seed, CLASSIFIER_STREAM, step, "shift")``.
:func:`load_or_train_reference_classifier` caches the trained weights in a safetensors file
keyed by a fingerprint of the data, so every run of a project judges samples with the same classifier.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .data import BatchSampler, ImageData
from .seeding import make_generator

log = logging.getLogger(__name__)

CLASSIFIER_STREAM = 10_000          # BatchSampler stream of the classifier (diffusion blocks use 0..B-1).
CACHE_FORMAT = "diffusionblocks-refclf/1"
_MIN_STEPS, _MAX_STEPS = 300, 4000  # Bounds of the default number of training steps.
_DEFAULT_EPOCHS = 12                # Default passes over the data, within those bounds.
_WARMUP_FRACTION = 0.05             # Linear LR warm-up, as a fraction of the steps; cosine decay after.
_WEIGHT_DECAY = 1e-4                # AdamW weight decay on matrices and kernels.
_STEM_STRIDE_FROM = 16              # Images at least this large get a stride-2 first convolution.


# ----------------------------------------------------------------------------------------------
# Model


class ReferenceClassifier(nn.Module):
    """Small CNN over N x C x H x W images in [-1, 1]: four 3x3 conv stages, global pool, two linears.

    conv3x3(C->32) (stride 2 for images of 16 px or more) -> conv3x3(32->64, stride 2) ->
    conv3x3(64->128, stride 2) -> conv3x3(128->128, stride 2), each followed by GroupNorm(8) and
    SiLU; global average pool; Linear(128->feature_dim) + SiLU (the features);
    Linear(feature_dim->num_classes) (the logits). The receptive field (17 px for 8 px images,
    31 px for larger ones) covers the whole image, which global pooling needs.
    """

    def __init__(self, in_channels: int, num_classes: int, feature_dim: int = 128,
                 generator: torch.Generator | None = None) -> None:
        """Builds the network with weights drawn from `generator` (default: a fixed seed), never the global RNG."""
        super().__init__()
        if in_channels < 1 or num_classes < 2 or feature_dim < 1:
            raise ValueError(f"need in_channels >= 1, num_classes >= 2, feature_dim >= 1; got "
                             f"{in_channels}, {num_classes}, {feature_dim}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        # The layer constructors draw their default init from the global RNG: fork it so the caller's
        # global stream is left untouched, then overwrite every parameter from `generator` below.
        with torch.random.fork_rng(devices=[]):
            self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
            self.norm1 = nn.GroupNorm(8, 32)
            self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
            self.norm2 = nn.GroupNorm(8, 64)
            self.conv3 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
            self.norm3 = nn.GroupNorm(8, 128)
            self.conv4 = nn.Conv2d(128, 128, 3, stride=2, padding=1)
            self.norm4 = nn.GroupNorm(8, 128)
            self.proj = nn.Linear(128, feature_dim)
            self.head = nn.Linear(feature_dim, num_classes)
        self.reset_parameters(generator if generator is not None else make_generator(0, "refclf", "init"))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Re-initialises every parameter from `generator` (PyTorch's default schemes)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations, (N, feature_dim), of images x (N, C, H, W)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images N x {self.in_channels} x H x W, got {tuple(x.shape)}")
        # The first conv keeps small images (digits) at full resolution and halves larger ones
        # (MNIST, CIFAR), which keeps training on 2 CPU cores to seconds; the weights are the same.
        stride = 1 if min(x.shape[-2:]) < _STEM_STRIDE_FROM else 2
        h = F.conv2d(x, self.conv1.weight, self.conv1.bias, stride=stride, padding=1)
        h = F.silu(self.norm1(h))              # (N, 32, H / stride, W / stride)
        h = F.silu(self.norm2(self.conv2(h)))  # (N, 64, ...): halved again
        h = F.silu(self.norm3(self.conv3(h)))  # (N, 128, ...): halved again
        h = F.silu(self.norm4(self.conv4(h)))  # (N, 128, h', w'): 1x1 for 8 px, 2x2 for 28 and 32 px
        h = h.mean(dim=(2, 3))                 # (N, 128): global average pool
        return F.silu(self.proj(h))            # (N, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, (N, num_classes), of images x (N, C, H, W)."""
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------------
# Training


def max_shift(image_size: int) -> int:
    """Largest random shift (pixels) used in training: 1 for small images (< 16 px), else 2."""
    return 1 if image_size < 16 else 2


def random_shift(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shifts each image by its own offset in [-shift, shift]^2, replicating the edge pixels."""
    if shift <= 0:
        return images
    n, c, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")  # (N, C, H + 2s, W + 2s)
    offsets = torch.randint(0, 2 * shift + 1, (2, n), generator=generator).to(images.device)
    rows = offsets[0, :, None] + torch.arange(h, device=images.device)      # (N, H)
    cols = offsets[1, :, None] + torch.arange(w, device=images.device)      # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None, None]       # (N, 1, 1, 1)
    chans = torch.arange(c, device=images.device)[None, :, None, None]       # (1, C, 1, 1)
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]  # (N, C, H, W)


def default_steps(num_images: int, batch_size: int = 128) -> int:
    """Default training steps: about 12 epochs, at least 300 and at most 4,000 (digits 300, MNIST 8,000: 750)."""
    epochs_steps = math.ceil(_DEFAULT_EPOCHS * num_images / batch_size)
    return int(min(max(epochs_steps, _MIN_STEPS), _MAX_STEPS))


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up then cosine decay to zero; the multiplier of the base LR at `step`."""
    warmup = max(1, round(_WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_reference_classifier(data: ImageData, *, seed: int = 0, steps: int | None = None,
                               batch_size: int = 128, lr: float = 2e-3, device: str | torch.device = "cpu",
                               progress: bool = False) -> ReferenceClassifier:
    """Trains a ReferenceClassifier on `data` (deterministic given seed); returns it in eval mode."""
    if len(data) == 0:
        raise ValueError(f"{data.name}: cannot train a classifier on an empty dataset")
    steps = default_steps(len(data), batch_size) if steps is None else int(steps)
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    device = torch.device(device)
    model = ReferenceClassifier(data.num_channels, data.num_classes,
                                generator=make_generator(seed, "refclf", "init")).to(device)
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": _WEIGHT_DECAY},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    sampler = BatchSampler(data, batch_size, seed=seed, stream=CLASSIFIER_STREAM)
    shift = max_shift(data.image_size)
    model.train()
    start = time.perf_counter()
    loss_sum, correct, seen = 0.0, 0, 0
    for step in tqdm(range(steps), desc=f"reference classifier ({data.name})", disable=not progress):
        images, labels = sampler.batch(step)
        images = random_shift(images, shift, make_generator(seed, CLASSIFIER_STREAM, step, "shift"))
        images, labels = images.to(device), labels.to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr * _lr_factor(step, steps)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= steps - 50:  # running statistics of the last 50 steps, for the log line
            loss_sum += float(loss.detach()) * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
    model.eval()
    if seen:
        log.info("reference classifier on %s: %d steps in %.1fs, final train loss %.4f, train acc %.4f",
                 data.name, steps, time.perf_counter() - start, loss_sum / seen, correct / seen)
    return model


# ----------------------------------------------------------------------------------------------
# Metrics


@torch.no_grad()
def predict(clf: ReferenceClassifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted class indices (int64, on the CPU) of images (N, C, H, W), evaluated in batches."""
    device = next(clf.parameters()).device
    preds = [clf(images[i: i + batch_size].to(device, torch.float32)).argmax(dim=1).cpu()
             for i in range(0, len(images), batch_size)]
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)


def accuracy(clf: ReferenceClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose predicted class equals their label."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("accuracy of an empty set of images is undefined")
    return float((predict(clf, images) == labels.cpu().long()).double().mean())


def conditional_accuracy(clf: ReferenceClassifier, images: torch.Tensor, requested_labels: torch.Tensor) -> float:
    """Fraction of generated images that the classifier assigns to the class they were generated for."""
    return accuracy(clf, images, requested_labels)


def union(sets: list[ImageData], by_domain: bool = False) -> ImageData:
    """The images of several datasets of one shape as one set, labelled by class, or by_domain by the index of
    the set they come from: the training data of a *domain judge*, a reference classifier that tells which
    domain (digits or digits-thick, say) an image belongs to."""
    if len({(s.num_channels, s.image_size) for s in sets}) != 1:
        raise ValueError("union: the sets' images differ in shape")
    labels = [torch.full((len(s),), i, dtype=torch.int64) if by_domain else s.labels for i, s in enumerate(sets)]
    num_classes = len(sets) if by_domain else max(s.num_classes for s in sets)
    name = "|".join(s.name for s in sets) + ("-domain" if by_domain else "")
    return ImageData(torch.cat([s.images for s in sets]), torch.cat(labels), num_classes, name)


# ----------------------------------------------------------------------------------------------
# Cache


def data_fingerprint(data: ImageData) -> str:
    """sha256 hex digest of the images' float32 bytes, the labels' int64 bytes and num_classes."""
    digest = hashlib.sha256()
    images = data.images.detach().to("cpu", torch.float32).contiguous()
    labels = data.labels.detach().to("cpu", torch.int64).contiguous()
    digest.update(images.numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    digest.update(str(int(data.num_classes)).encode())
    return digest.hexdigest()


def reference_classifier_path(data: ImageData, cache_dir: str | Path, seed: int = 0,
                              fingerprint: str | None = None) -> Path:
    """The cache file of the classifier of `data` and `seed`: refclf-<name>-<fingerprint[:16]>-s<seed>.safetensors."""
    fingerprint = fingerprint or data_fingerprint(data)
    safe_name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in data.name)
    return Path(cache_dir) / f"refclf-{safe_name}-{fingerprint[:16]}-s{seed}.safetensors"


def _read_cache(path: Path, expected: dict[str, Any], device: torch.device) -> tuple[ReferenceClassifier, dict] | None:
    """The cached classifier and its metadata, or None (with a warning) if it is unreadable or stale."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        meta: dict[str, Any] = {"format": raw.get("format"), "fingerprint": raw.get("fingerprint"),
                                "name": raw.get("name")}
        for key in ("seed", "steps", "in_channels", "num_classes", "feature_dim", "image_size"):
            meta[key] = int(raw[key])
        stale = [k for k, v in expected.items() if meta.get(k) != v]
        if stale:
            log.warning("reference classifier cache %s does not match the request (%s); retraining", path,
                        ", ".join(f"{k}: {meta.get(k)!r} != {expected[k]!r}" for k in stale))
            return None
        state = load_file(str(path))
        model = ReferenceClassifier(meta["in_channels"], meta["num_classes"], meta["feature_dim"])
        model.load_state_dict(state, strict=True)
    except Exception as e:  # noqa: BLE001 - any unreadable cache file is retrained, never fatal
        log.warning("reference classifier cache %s is unreadable (%s: %s); retraining", path,
                    type(e).__name__, e)
        return None
    return model.to(device).eval(), meta


def _write_cache(path: Path, model: ReferenceClassifier, meta: dict[str, Any]) -> bool:
    """Writes the classifier to `path` atomically (temp file in the same directory, then rename)."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp), metadata={k: str(v) for k, v in meta.items()})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return True
    except OSError as e:
        log.warning("could not write the reference classifier cache %s: %s", path, e)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        return False


def load_or_train_reference_classifier(data: ImageData, cache_dir: str | Path, *, seed: int = 0,
                                       steps: int | None = None, device: str | torch.device = "cpu",
                                       progress: bool = False) -> tuple[ReferenceClassifier, dict]:
    """The reference classifier of `data` from cache_dir, trained (and cached) first if needed.

    Returns (classifier in eval mode, metadata); metadata["cached"] says whether it was loaded.
    A cache file that is corrupt, or whose metadata does not match (fingerprint, seed, steps...),
    is retrained and atomically replaced.
    """
    device = torch.device(device)
    fingerprint = data_fingerprint(data)
    path = reference_classifier_path(data, cache_dir, seed, fingerprint)
    steps = default_steps(len(data)) if steps is None else int(steps)
    meta: dict[str, Any] = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "name": data.name,
                            "seed": int(seed), "steps": steps, "in_channels": data.num_channels,
                            "num_classes": int(data.num_classes), "feature_dim": 128,
                            "image_size": data.image_size}
    if path.is_file():
        loaded = _read_cache(path, {k: v for k, v in meta.items() if k != "name"}, device)
        if loaded is not None:
            model, cached_meta = loaded
            log.info("loaded reference classifier %s", path)
            return model, {**cached_meta, "cached": True, "path": str(path)}
    log.info("training reference classifier for %s (%d steps), cache %s", data.name, steps, path)
    model = train_reference_classifier(data, seed=seed, steps=steps, device=device, progress=progress)
    _write_cache(path, model, meta)
    return model, {**meta, "cached": False, "path": str(path)}
