"""A folder of image files (PNG, JPEG, anything Pillow reads) as a labelled image set, fitted to the model.

Two layouts: images in class subfolders (``root/cat/1.png``, ``root/dog/a/2.jpg``: the sorted subfolder names
are the classes 0..K-1, each folder read recursively), or images directly in root (no labels: an unconditional
set, K = 0). Images are read in sorted path order (class by class), converted to the model's channels (grey "L"
or "RGB"; an alpha channel is dropped), resized so their shorter side is the model's image size (bicubic, with
Pillow's antialiasing) and center-cropped to a square. Files that are not images by their suffix are skipped;
an image file Pillow cannot read stops the load, naming it.

The decoded set lives in memory as uint8 (N x C x H x W); `data.py` splits and scales it like the built-in sets.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

try:
    from PIL import Image  # the optional extra diffusionblocks[images]
except ImportError:
    Image = None

from .config import ConfigError, shown_path

logger = logging.getLogger(__name__)

MODES = {1: "L", 3: "RGB"}  # model.in_channels -> the Pillow mode images are converted to


def pillow(field: str):
    """Pillow's Image module, or a ConfigError naming the extra to install."""
    if Image is None:
        raise ConfigError(f"{field} needs Pillow: pip install 'diffusionblocks[images]'")
    return Image


def image_suffixes() -> set[str]:
    """The file suffixes (lower case, with the dot) Pillow has a reader for."""
    pillow("data.dataset='folder'").init()
    return {s.lower() for s, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def check_model_shape(image_size: int | None, channels: int | None, field: str) -> tuple[int, int]:
    """(image_size, channels) to fit images to: the model's, which must be grey (1) or RGB (3)."""
    if image_size is None or channels is None:
        raise ConfigError(f"{field} fits images to the model: give its image size and channels")
    if channels not in MODES:
        raise ConfigError(f"{field}: images convert to grey (1 channel) or RGB (3), but model.in_channels="
                          f"{channels}")
    if image_size < 1:
        raise ConfigError(f"model.image_size must be at least 1, got {image_size}")
    return image_size, channels


def fit_image(img, image_size: int, channels: int) -> np.ndarray:
    """A Pillow image as the model takes it: uint8 C x H x W, its mode converted, its shorter side resized to
    image_size and the centre square cropped (the larger margin below and right when odd)."""
    img = img.convert(MODES[channels])
    w, h = img.size
    if min(w, h) != image_size:
        scale = image_size / min(w, h)
        w, h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    if (w, h) != (image_size, image_size):
        left, top = (w - image_size) // 2, (h - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (H, W) or (H, W, C) -> (C, H, W)


def check_memory(n: int, image_size: int, channels: int, limit_gb: float, what: str) -> None:
    """Refuses a set whose float32 tensors would take more than data.memory_limit_gb."""
    need = n * channels * image_size * image_size * 4 / 2**30
    if need > limit_gb:
        raise ConfigError(f"{what}: {n} images of {channels}x{image_size}x{image_size} take {need:.1f} GiB as "
                          f"float32 in memory, above data.memory_limit_gb={limit_gb:g}; raise it, or use fewer or "
                          "smaller images")


def _images_under(folder: Path, suffixes: set[str]) -> list[Path]:
    """Image files below folder (recursively), sorted by path; hidden files and folders skipped."""
    found = []
    for p in folder.rglob("*"):
        parts = p.relative_to(folder).parts
        if p.is_file() and p.suffix.lower() in suffixes and not any(s.startswith(".") for s in parts):
            found.append(p)
    return sorted(found)


def list_image_folder(root: str | Path) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """(files, their class ids, class names) of a folder in either layout; ConfigError on what it cannot read."""
    path = Path(root).expanduser()
    if not path.exists():
        raise ConfigError(f"data.root {shown_path(root)} does not exist (data.dataset='folder' reads a folder of "
                          "images)")
    if not path.is_dir():
        raise ConfigError(f"data.root {shown_path(root)} is not a folder (data.dataset='folder')")
    suffixes = image_suffixes()
    top = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes
                 and not p.name.startswith("."))
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = {d.name: _images_under(d, suffixes) for d in folders}
    per_class = {name: files for name, files in per_class.items() if files}
    if top and per_class:
        raise ConfigError(f"data.root {shown_path(root)} has images both directly in it ({top[0].name}...) and in "
                          f"class subfolders ({', '.join(list(per_class)[:3])}...): put every image in a class "
                          "subfolder (labelled), or all directly in the folder (unconditional)")
    if top:
        return top, [0] * len(top), ()
    if not per_class:
        kinds = ", ".join(sorted(suffixes & {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}))
        raise ConfigError(f"data.root {shown_path(root)} has no images ({kinds}... directly in it or in class "
                          "subfolders)")
    classes = tuple(per_class)  # sorted folder names
    files = [f for name in classes for f in per_class[name]]
    labels = [k for k, name in enumerate(classes) for _ in per_class[name]]
    return files, labels, classes


def read_image_file(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One image file fitted to the model (`fit_image`); ConfigError naming the file when Pillow cannot read it."""
    try:
        with Image.open(path) as img:
            return fit_image(img, image_size, channels)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ConfigError(f"cannot read image {str(path)!r} in data.root: {e}") from None


def read_image_folder(root: str | Path, image_size: int | None, channels: int | None,
                      memory_limit_gb: float) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(uint8 N x C x H x W images, int64 labels, class names) of the folder root, fitted to the model."""
    image_size, channels = check_model_shape(image_size, channels, "data.dataset='folder'")
    files, labels, classes = list_image_folder(root)
    check_memory(len(files), image_size, channels, memory_limit_gb, f"data.root {shown_path(root)}")
    images = np.empty((len(files), channels, image_size, image_size), dtype=np.uint8)
    for i, f in enumerate(files):
        images[i] = read_image_file(f, image_size, channels)
    logger.info("data.root %s: %d images, %s", shown_path(root), len(files),
                f"{len(classes)} classes (0..{len(classes) - 1}): {', '.join(classes)}" if classes
                else "no class subfolders (unconditional)")
    return images, np.asarray(labels, dtype=np.int64), classes
