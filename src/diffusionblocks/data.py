"""Image datasets and deterministic batch sampling.

Four datasets are built in, and two kinds of the user's own, all returned as float32 tensors N x C x H x W
scaled to [-1, 1] with int64 labels:

* ``digits``: scikit-learn's embedded 8x8 digits (1,797 images, no files needed).
* ``mnist``: the standard IDX files (plain or ``.gz``) in ``data.root``.
* ``cifar10``: the CIFAR-10 "python version" batches in ``data.root``.
* ``cifar100``: the CIFAR-100 "python version" files in ``data.root`` (the 100 fine labels).
* ``folder``: a folder of image files in ``data.root``, labelled by class subfolders or unlabelled
  (`image_folder.py`), fitted to the model's image size and channels.
* ``hf``: a Hugging Face dataset in ``data.root`` (`hf_datasets.py`): its image and label columns, fitted likewise.

Each grey-scale dataset also comes in two other *domains*, the same images and labels transformed, for
experiments on adapting and composing blocks across domains: ``digits-thick`` / ``mnist-thick`` (strokes
thickened by a grey dilation) and ``digits-inverted`` / ``mnist-inverted`` (colours inverted).

Every train/test split is made by a fixed permutation, so it is the same on every machine and run.
Randomness during training comes only from :func:`derive_seed`, a pure function of
(seed, stream, step, purpose...), so a resumed or parallel run draws exactly the same batches.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from .config import ConfigError, check_choice, shown_path
from .hf_datasets import HF_FORMATS, load_hf_images
from .image_folder import read_image_folder
from .seeding import make_generator

log = logging.getLogger(__name__)

_SPLIT_SEED = 0                   # Seed of the fixed permutations that split a file set into train/test.
_DIGITS_TEST = 297                # Default held-out digits images (1,500 remain for training).
_TEST_SPLIT_HOLDOUT = 2000        # Default held-out images when training on a test file set (split="test").
_DOWNLOAD_TIMEOUT_S = 60.0

MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_MNIST_FILES = {  # name -> md5 of the standard .gz file (checked on download only)
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
_IDX_IMAGES_MAGIC = 0x00000803    # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801    # unsigned byte, 1 dimension



def thicken(images: torch.Tensor) -> torch.Tensor:
    """Grey dilation of light strokes on a dark ground: each pixel takes the brightest value under a structuring
    element, 1 x 2 (the pixel and its left neighbour) for images under 16 px, 3 x 3 for larger ones (MNIST)."""
    if images.shape[-1] < 16:
        left = F.pad(images, (1, 0), value=-1.0)[..., :-1]  # (N, C, H, W), shifted one pixel to the right
        return torch.maximum(images, left)
    return F.max_pool2d(images, 3, stride=1, padding=1)


def invert(images: torch.Tensor) -> torch.Tensor:
    """Dark strokes on a light ground: x -> -x on the [-1, 1] scale."""
    return -images


# Other domains of a grey-scale dataset: its images transformed, its labels and splits unchanged.
DOMAINS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"thick": thicken, "inverted": invert}
_BASE_DATASETS = ("digits", "mnist", "cifar10", "cifar100")
USER_DATASETS = ("folder", "hf")  # the user's images, fitted to the model's image size and channels
DATASETS = (*_BASE_DATASETS, *(f"{base}-{d}" for base in ("digits", "mnist") for d in DOMAINS), *USER_DATASETS)


def split_domain(dataset: str) -> tuple[str, str | None]:
    """'mnist-thick' -> ('mnist', 'thick'); 'mnist' -> ('mnist', None)."""
    base, _, domain = dataset.partition("-")
    return (base, domain) if domain in DOMAINS else (dataset, None)


@dataclass(frozen=True)
class DataConfig:
    """The image dataset of the image tasks (generation and classification)."""

    dataset: str = "digits"      # "digits" (scikit-learn, embedded), "mnist" (IDX files), "cifar10" or "cifar100";
                                 # "digits-thick", "digits-inverted", "mnist-thick", "mnist-inverted": other domains;
                                 # "folder" (image files) or "hf" (a Hugging Face dataset): the user's images.
    root: str | None = None      # Directory of the dataset files (mnist, cifar10, cifar100, folder), or the Hugging
                                 # Face dataset (hf: a save_to_disk folder, or data files, a glob or their folder).
    download: bool = False       # Fetch the standard files into root when they are missing.
    split: str = "train"         # Which files to train on: "train", or "test" to train on part of the test files.
    holdout: int = 0             # Images held out of the training split for evaluation (0 = dataset default).
    hflip: bool = False          # Random horizontal flips during training (natural images only).
    crop_padding: int = 0        # Random crops: pad by this many pixels (edge copies), crop back; 0 = off.
    hf_format: str = "disk"      # hf: "disk" (save_to_disk folder) or a builder of local files: "parquet", "json",
                                 # "csv", "imagefolder".
    hf_split: str = "train"      # hf: the split trained on.
    hf_test_split: str = ""      # hf: the held-out split; "" = data.holdout images of hf_split held out.
    image_column: str = "image"  # hf: the column of images.
    label_column: str = "label"  # hf: the column of class labels; "" = none (an unconditional generator).
    memory_limit_gb: float = 8.0  # folder, hf: the most GiB the decoded images (float32) may take in memory.

    def validate(self) -> None:
        check_choice("data.dataset", self.dataset, DATASETS)
        check_choice("data.split", self.split, ("train", "test"))
        check_choice("data.hf_format", self.hf_format, HF_FORMATS)
        if self.crop_padding < 0 or self.holdout < 0:
            raise ConfigError("data.crop_padding and data.holdout must be non-negative")
        if not self.memory_limit_gb > 0:
            raise ConfigError(f"data.memory_limit_gb must be positive, got {self.memory_limit_gb}")
        if split_domain(self.dataset)[0] != "digits" and self.root is None:
            raise ConfigError(f"data.root is required for data.dataset={self.dataset!r}")


@dataclass(frozen=True)
class CifarSpec:
    """One dataset in the CIFAR "python version" format: pickled dicts of uint8 N x 3072 rows and labels."""

    dataset: str                   # The data.dataset value, also the prefix of the ImageData names.
    display: str                   # Name shown in messages, e.g. "CIFAR-10".
    directory: str                 # Directory the archive extracts to (the files may also lie in root itself).
    train_files: tuple[str, ...]   # Training files, in order.
    test_file: str                 # Test file.
    label_key: str                 # Pickle entry holding the labels.
    num_classes: int
    url: str                       # The .tar.gz archive (data.download=true).
    md5: str                       # md5 of the archive.

    @property
    def archive(self) -> str:
        """File name of the downloaded archive."""
        return self.url.rsplit("/", 1)[-1]


CIFAR10 = CifarSpec(
    dataset="cifar10", display="CIFAR-10", directory="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_file="test_batch", label_key="labels",
    num_classes=10, url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a")
CIFAR100 = CifarSpec(
    dataset="cifar100", display="CIFAR-100", directory="cifar-100-python",
    train_files=("train",), test_file="test", label_key="fine_labels",
    num_classes=100, url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85")
_CIFAR_SPECS = {spec.dataset: spec for spec in (CIFAR10, CIFAR100)}  # Looked up at load time.


def _tensor_fields(data) -> dict[str, torch.Tensor]:
    """The tensors of a dataset container (a dataclass) by field name; none for anything else."""
    if not dataclasses.is_dataclass(data):
        return {}
    return {f.name: getattr(data, f.name) for f in dataclasses.fields(data) if torch.is_tensor(getattr(data, f.name))}


def to_device(data, device: str | torch.device):
    """A dataset container (a dataclass such as ImageData or TokenStream) with its tensors on `device`; anything
    else is returned as it is."""
    moved = {name: t.to(device) for name, t in _tensor_fields(data).items()}
    return dataclasses.replace(data, **moved) if moved else data


def tensor_bytes(data) -> int:
    """Bytes of the tensors a dataset container (a dataclass) holds."""
    return sum(t.nbytes for t in _tensor_fields(data).values())


# ----------------------------------------------------------------------------------------------
# Containers


@dataclass(frozen=True)
class ImageData:
    """Images (float32, N x C x H x W in [-1, 1]) with their int64 labels in [0, num_classes)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    classes: tuple[str, ...] = ()  # The name of each class, where the dataset has them (folder, hf).

    def __post_init__(self) -> None:
        """Checks shapes and dtypes."""
        if self.images.ndim != 4 or self.images.dtype != torch.float32:
            raise ValueError(f"{self.name}: images must be float32 N x C x H x W, "
                             f"got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.ndim != 1 or self.labels.dtype != torch.int64:
            raise ValueError(f"{self.name}: labels must be int64 of shape (N,), "
                             f"got {self.labels.dtype} {tuple(self.labels.shape)}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    @property
    def num_channels(self) -> int:
        """Channels per image."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """Height = width of the (square) images."""
        h, w = self.images.shape[-2:]
        if h != w:
            raise ValueError(f"{self.name}: images are {h}x{w}, not square")
        return int(h)

    def __len__(self) -> int:
        """Number of images."""
        return int(self.images.shape[0])


@dataclass(frozen=True)
class ImageSplits:
    """A training set and a held-out test set of the same dataset."""

    train: ImageData
    test: ImageData


# ----------------------------------------------------------------------------------------------
# Loading


def load_image_data(cfg: DataConfig, image_size: int | None = None, channels: int | None = None) -> ImageSplits:
    """Loads the dataset `cfg` names and splits it into train and test; raises ConfigError on bad input.

    The user's images (folder, hf) are fitted to image_size and channels, the model's (`image_folder.fit_image`);
    the built-in sets are as they are. A folder, or an hf dataset without data.hf_test_split, is split by the fixed
    permutation of `_split_fixed`, data.holdout images held out (0 means a tenth).

    split="train" trains on the dataset's training files and tests on its test files (for mnist,
    cifar10 and cifar100 ``holdout`` is then ignored); split="test" uses only the test files, split by
    a fixed permutation into N - holdout training and holdout test images (holdout 0 means 2,000).
    digits has a single set of 1,797 images, split likewise (holdout 0 means 297).
    The augmentations (hflip, crop_padding) are applied by :class:`BatchSampler`, not here; this only
    checks them and warns where they make little sense.
    """
    if cfg.split not in ("train", "test"):
        raise ConfigError(f"data.split={cfg.split!r} is not one of 'train', 'test'")
    if cfg.holdout < 0:
        raise ConfigError(f"data.holdout must be non-negative, got {cfg.holdout}")
    if cfg.crop_padding < 0:
        raise ConfigError(f"data.crop_padding must be non-negative, got {cfg.crop_padding}")
    check_choice("data.dataset", cfg.dataset, DATASETS)
    base, domain = split_domain(cfg.dataset)
    if cfg.hflip and base in ("digits", "mnist"):
        log.warning("data.hflip=true on %s: horizontal flips change the meaning of digits", cfg.dataset)
    if cfg.crop_padding > 0 and base == "digits":
        log.warning("data.crop_padding=%d on digits: random crops of 8x8 images shift the digit by up to %d "
                    "pixel(s) and replicate its edges", cfg.crop_padding, cfg.crop_padding)
    if base in USER_DATASETS:
        splits = _load_user_images(cfg, image_size, channels)
    elif base == "digits":
        splits = _load_digits(cfg)
    elif base == "mnist":
        splits = _load_mnist(cfg)
    else:
        splits = _load_cifar(cfg, _CIFAR_SPECS[base])
    if domain is not None:
        splits = ImageSplits(*(ImageData(DOMAINS[domain](s.images), s.labels, s.num_classes,
                                         s.name.replace(base, cfg.dataset, 1)) for s in (splits.train, splits.test)))
    log.info("loaded %s: %d train, %d test images of %dx%dx%d", cfg.dataset, len(splits.train),
             len(splits.test), splits.train.num_channels, splits.train.image_size, splits.train.image_size)
    return splits


def _split_fixed(images: torch.Tensor, labels: torch.Tensor, holdout: int, num_classes: int,
                 dataset: str, classes: tuple[str, ...] = ()) -> ImageSplits:
    """Splits one image set into train (N - holdout) and test (holdout) by a fixed permutation."""
    n = len(images)
    if not 0 < holdout < n:
        raise ConfigError(f"data.holdout={holdout} must be between 1 and {n - 1} for {dataset} ({n} images)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_SPLIT_SEED))
    train_idx, _ = perm[: n - holdout].sort()
    test_idx, _ = perm[n - holdout:].sort()
    return ImageSplits(
        train=ImageData(images[train_idx], labels[train_idx], num_classes, f"{dataset}-train", classes),
        test=ImageData(images[test_idx], labels[test_idx], num_classes, f"{dataset}-test", classes))


def _load_user_images(cfg: DataConfig, image_size: int | None, channels: int | None) -> ImageSplits:
    """A folder of images or a Hugging Face dataset, fitted to the model: its test split, or data.holdout held out."""
    if cfg.split != "train":
        raise ConfigError(f"data.split={cfg.split!r} is not available for data.dataset={cfg.dataset!r}: use "
                          "data.split='train'" + (" and data.hf_test_split" if cfg.dataset == "hf" else "")
                          + " (data.holdout sets the held-out size)")
    if cfg.root is None:
        raise ConfigError(f"data.root is required for data.dataset={cfg.dataset!r}")
    if cfg.dataset == "folder":
        images, labels, classes = read_image_folder(cfg.root, image_size, channels, cfg.memory_limit_gb)
        test = None
    else:
        (images, labels), test, classes = load_hf_images(
            cfg.root, cfg.hf_format, cfg.hf_split, cfg.hf_test_split, cfg.image_column, cfg.label_column,
            image_size, channels, cfg.memory_limit_gb)
    K = len(classes)
    name = Path(cfg.root).name or cfg.dataset
    for part in (labels, *(() if test is None else (test[1],))):
        _check_labels(part, K or 1, f"data.root {shown_path(cfg.root)}")
    if test is not None:
        if cfg.holdout:
            log.warning("data.holdout=%d is ignored: data.hf_test_split=%r is the test set", cfg.holdout,
                        cfg.hf_test_split)
        return ImageSplits(train=ImageData(_uint8_to_unit(images), torch.from_numpy(labels), K, f"{name}-train",
                                           classes),
                           test=ImageData(_uint8_to_unit(test[0]), torch.from_numpy(test[1]), K, f"{name}-test",
                                          classes))
    holdout = cfg.holdout or max(1, len(images) // 10)
    return _split_fixed(_uint8_to_unit(images), torch.from_numpy(labels), holdout, K, name, classes)


def _load_digits(cfg: DataConfig) -> ImageSplits:
    """scikit-learn's 8x8 digits (values 0..16), split 1,500 / 297 by default."""
    if cfg.split != "train":
        raise ConfigError(f"data.split={cfg.split!r} is not available for data.dataset='digits': it has one "
                          "split; use data.split='train' (data.holdout sets the test size)")
    digits = load_digits()
    images = torch.from_numpy(np.asarray(digits.images, dtype=np.float32)).unsqueeze(1) / 8.0 - 1.0
    labels = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    return _split_fixed(images, labels, cfg.holdout or _DIGITS_TEST, 10, "digits")


def _root(cfg: DataConfig) -> Path:
    """The dataset directory; created when downloading, else it must exist."""
    if cfg.root is None:
        raise ConfigError(f"data.root is required for data.dataset={cfg.dataset!r}")
    root = Path(cfg.root).expanduser()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"data.root '{root}' is not a directory")
    if not root.exists():
        if not cfg.download:
            raise ConfigError(f"data.root {shown_path(root)} does not exist "
                              "(data.download=true creates it and fetches the files)")
        root.mkdir(parents=True, exist_ok=True)
    return root


def _uint8_to_unit(x: np.ndarray) -> torch.Tensor:
    """Maps uint8 pixels 0..255 to float32 in [-1, 1]."""
    return torch.from_numpy(x).to(torch.float32).div_(127.5).sub_(1.0)


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
    """Raises ConfigError if a label is outside [0, num_classes)."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"{what} has labels outside 0..{num_classes - 1} "
                          f"(min {labels.min()}, max {labels.max()}); the file is corrupt")


# --- MNIST ------------------------------------------------------------------------------------


def _read_idx(path: Path, magic: int, gzipped: bool | None = None, shown: str | None = None) -> np.ndarray:
    """Parses an IDX file of unsigned bytes with the given magic; gzipped defaults to a .gz name."""
    shown = shown or str(path)
    if gzipped is None:
        gzipped = path.name.endswith(".gz")
    try:
        if gzipped:
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise ConfigError(f"cannot read MNIST file '{shown}': {e} (corrupt or truncated?)") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"MNIST file '{shown}' is truncated: {len(raw)} bytes, shorter than its header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ConfigError(f"MNIST file '{shown}' has magic number 0x{found:08x}, expected 0x{magic:08x} "
                          "(not an IDX file of this kind)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        kind = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise ConfigError(f"MNIST file '{shown}' is {kind}: header dims {dims} need {expected} data bytes, "
                          f"found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _mnist_path(root: Path, name: str) -> Path | None:
    """The existing file for IDX `name` in root, plain preferred over .gz; None if neither exists."""
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _download(urls: list[str], dest: Path, md5: str | None,
              verify: Callable[[Path], object] | None = None) -> None:
    """Downloads the first working URL to `dest` atomically (temp file in the same directory, then rename).

    The temp file must match `md5` (if given) and pass `verify` (if given) before it is renamed.
    """
    errors = []
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            log.info("downloading %s", url)
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
                shutil.copyfileobj(resp, out)
            if md5 is not None:
                digest = hashlib.md5(tmp.read_bytes()).hexdigest()
                if digest != md5:
                    raise OSError(f"md5 {digest} does not match the expected {md5}")
            if verify is not None:
                verify(tmp)
            os.replace(tmp, dest)
            return
        except (OSError, ValueError) as e:  # urllib.error.URLError is an OSError
            errors.append(f"{url}: {e}")
            tmp.unlink(missing_ok=True)
    raise ConfigError(f"could not download '{dest.name}': " + "; ".join(errors))


def _mnist_files(root: Path, names: list[str], download: bool) -> dict[str, Path]:
    """Finds (or downloads) the IDX files `names` in root."""
    found = {name: _mnist_path(root, name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing and not download:
        raise ConfigError(f"MNIST file(s) missing from data.root '{root}': "
                          + ", ".join(f"{n} (or {n}.gz)" for n in missing)
                          + "; data.download=true fetches them")
    for name in missing:
        dest = root / f"{name}.gz"
        magic = _IDX_IMAGES_MAGIC if "-images-" in name else _IDX_LABELS_MAGIC
        _download([m + f"{name}.gz" for m in MNIST_MIRRORS], dest, _MNIST_FILES[name],
                  verify=lambda tmp, magic=magic, dest=dest: _read_idx(tmp, magic, gzipped=True, shown=str(dest)))
        found[name] = dest
    return {name: path for name, path in found.items() if path is not None}


def _mnist_pair(files: dict[str, Path], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads `{prefix}-images-idx3-ubyte` and its labels; checks they match."""
    img_path, lab_path = files[f"{prefix}-images-idx3-ubyte"], files[f"{prefix}-labels-idx1-ubyte"]
    images = _read_idx(img_path, _IDX_IMAGES_MAGIC)
    labels = _read_idx(lab_path, _IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise ConfigError(f"MNIST files '{img_path}' and '{lab_path}' do not match: "
                          f"{len(images)} images but {len(labels)} labels")
    if images.shape[1] != images.shape[2] or len(images) == 0:
        raise ConfigError(f"MNIST file '{img_path}' holds {images.shape[0]} images of "
                          f"{images.shape[1]}x{images.shape[2]}; expected square images")
    _check_labels(labels, 10, f"MNIST file '{lab_path}'")
    return _uint8_to_unit(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _load_mnist(cfg: DataConfig) -> ImageSplits:
    """MNIST from IDX files: train files / t10k files, or the t10k files split (split='test')."""
    root = _root(cfg)
    prefixes = ["train", "t10k"] if cfg.split == "train" else ["t10k"]
    names = [f"{p}-{k}" for p in prefixes for k in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    files = _mnist_files(root, names, cfg.download)
    if cfg.split == "test":
        images, labels = _mnist_pair(files, "t10k")
        return _split_fixed(images, labels, cfg.holdout or _TEST_SPLIT_HOLDOUT, 10, "mnist")
    if cfg.holdout:
        log.warning("data.holdout=%d is ignored with data.split='train': the t10k files are the test set",
                    cfg.holdout)
    train = _mnist_pair(files, "train")
    test = _mnist_pair(files, "t10k")
    if train[0].shape[1:] != test[0].shape[1:]:
        raise ConfigError(f"MNIST train images are {tuple(train[0].shape[2:])} but t10k images are "
                          f"{tuple(test[0].shape[2:])}")
    return ImageSplits(train=ImageData(*train, 10, "mnist-train"), test=ImageData(*test, 10, "mnist-test"))


# --- CIFAR-10 / CIFAR-100 -------------------------------------------------------------------


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays, never arbitrary callables."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        """Resolves only the allowed numpy reconstructors (numpy.core is mapped to numpy._core)."""
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"forbidden object {module}.{name} in the pickle")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]
        return getattr(importlib.import_module(module), name)


def _read_cifar_batch(path: Path, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR python file of `spec`: uint8 N x 3 x 32 x 32 images and int64 labels."""
    what = f"{spec.display} file '{path}'"
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError) as e:
        raise ConfigError(f"cannot read {what}: {e} (corrupt or truncated?)") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{what} does not hold a dict (not a {spec.display} python batch)")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or spec.label_key not in d:
        raise ConfigError(f"{what} lacks the 'data' or '{spec.label_key}' entry")
    data, labels = np.asarray(d["data"]), np.asarray(d[spec.label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ConfigError(f"{what} has data {data.dtype} {data.shape}, expected uint8 N x 3072")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"{what} has {len(data)} images but labels '{spec.label_key}' of shape "
                          f"{labels.shape} and type {labels.dtype}")
    _check_labels(labels, spec.num_classes, what)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_dir(root: Path, names: list[str], spec: CifarSpec) -> Path | None:
    """The directory holding the files: root/<spec.directory>, or root itself."""
    for d in (root / spec.directory, root):
        if any((d / n).is_file() for n in names):
            return d
    return None


def _download_cifar(root: Path, spec: CifarSpec) -> None:
    """Downloads and safely extracts the archive of `spec` into root/<spec.directory>."""
    archive = root / spec.archive
    if not archive.is_file():
        _download([spec.url], archive, spec.md5)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{spec.dataset}-extract.", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(tmp_dir, filter="data")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise ConfigError(f"cannot extract '{archive}': {e} (delete it to download again)") from None
        extracted = tmp_dir / spec.directory
        if not extracted.is_dir():
            raise ConfigError(f"'{archive}' does not contain {spec.directory}/")
        target = root / spec.directory
        if target.exists():
            shutil.rmtree(target)
        os.replace(extracted, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    archive.unlink(missing_ok=True)


def _load_cifar(cfg: DataConfig, spec: CifarSpec) -> ImageSplits:
    """A CIFAR python dataset: its train files / test file, or the test file split (split='test')."""
    root = _root(cfg)
    names = [*spec.train_files, spec.test_file] if cfg.split == "train" else [spec.test_file]
    folder = _cifar_dir(root, names, spec)
    missing = names if folder is None else [n for n in names if not (folder / n).is_file()]
    if missing:
        if not cfg.download:
            where = f"'{root / spec.directory}' or '{root}'"
            raise ConfigError(f"{spec.display} file(s) missing from {where}: {', '.join(missing)}; "
                              "data.download=true fetches them")
        _download_cifar(root, spec)
        folder = root / spec.directory
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ConfigError(f"the downloaded {spec.display} archive lacks {', '.join(missing)}")
    assert folder is not None

    def read(file_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_read_cifar_batch(folder / n, spec) for n in file_names]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        return _uint8_to_unit(images), torch.from_numpy(labels)

    k = spec.num_classes
    if cfg.split == "test":
        images, labels = read([spec.test_file])
        return _split_fixed(images, labels, cfg.holdout or _TEST_SPLIT_HOLDOUT, k, spec.dataset)
    if cfg.holdout:
        log.warning("data.holdout=%d is ignored with data.split='train': %s is the test set",
                    cfg.holdout, spec.test_file)
    train, test = read(list(spec.train_files)), read([spec.test_file])
    return ImageSplits(train=ImageData(*train, k, f"{spec.dataset}-train"),
                       test=ImageData(*test, k, f"{spec.dataset}-test"))


# ----------------------------------------------------------------------------------------------
# Batches


class BatchSampler:
    """Deterministic training batches: batch(step) depends only on (seed, stream, step), never on history.

    The batches are drawn and made where the data is: on a GPU, with the data moved there once (`to_device`),
    a step's batch costs no copy and no wait for the host; the draws then come from generators of that device,
    so the batches depend on (seed, stream, step) and the device type.

    The stream of indices is the concatenation of per-epoch permutations of the data, epoch e drawn
    from ``make_generator(seed, stream, e, "perm")``; the batch for step s is elements
    [s * batch_size, (s + 1) * batch_size) of it (a batch may straddle epochs, and may be larger than
    the data). With hflip, each image of step s's batch is flipped left-right with probability 1/2,
    drawn from ``make_generator(seed, stream, s, "flip")``. With crop_padding p > 0, each image (after
    the flip) is then padded by p pixels on every side with copies of its edge pixels (as
    ``torch.nn.functional.pad(..., mode="replicate")``) and cropped back to its size at an offset
    (dy, dx) drawn uniformly from [0, 2p] x [0, 2p] per image from ``make_generator(seed, stream, s,
    "crop")``; (p, p) is the identity. The crop is one gather with clamped indices, with no padded
    copy and no loop over images. The dataset is never modified.
    """

    _CACHE = 2  # Permutations kept; they only save time, never change results.

    def __init__(self, data: ImageData, batch_size: int, seed: int, stream: int, hflip: bool = False,
                 crop_padding: int = 0) -> None:
        """Samples from `data`; use one `stream` per block (or other independent consumer)."""
        if len(data) == 0:
            raise ValueError(f"{data.name}: cannot sample batches from an empty dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be non-negative, got {crop_padding}")
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.stream = stream
        self.hflip = hflip
        self.crop_padding = int(crop_padding)
        self._perms: OrderedDict[int, torch.Tensor] = OrderedDict()

    @property
    def device(self) -> torch.device:
        """Where the data is, and so where the batches are drawn and made (see `to_device`)."""
        return self.data.images.device

    def _perm(self, epoch: int) -> torch.Tensor:
        """The permutation of epoch `epoch` (cached)."""
        perm = self._perms.get(epoch)
        if perm is None:
            gen = make_generator(self.seed, self.stream, epoch, "perm", device=self.device)
            perm = torch.randperm(len(self.data), generator=gen, device=self.device)
            self._perms[epoch] = perm
            while len(self._perms) > self._CACHE:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(epoch)
        return perm

    def indices(self, step: int) -> torch.Tensor:
        """Dataset indices of the batch of global step `step` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        n = len(self.data)
        start, stop = step * self.batch_size, (step + 1) * self.batch_size
        pieces = []
        pos = start
        while pos < stop:
            epoch, offset = divmod(pos, n)
            take = min(n - offset, stop - pos)
            pieces.append(self._perm(epoch)[offset: offset + take])
            pos += take
        return torch.cat(pieces)

    def crop_offsets(self, step: int) -> torch.Tensor:
        """The (dy, dx) crop offsets in [0, 2 * crop_padding] of step `step`'s images, int64 B x 2."""
        p = self.crop_padding
        gen = make_generator(self.seed, self.stream, step, "crop", device=self.device)
        return torch.randint(0, 2 * p + 1, (self.batch_size, 2), generator=gen, device=self.device)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of global step `step`, images flipped if hflip, then cropped if crop_padding."""
        idx = self.indices(step)
        images = self.data.images[idx]  # advanced indexing copies: the dataset is never modified
        labels = self.data.labels[idx]
        if self.hflip:  # a select, not a masked assignment (which would wait for the device to count the mask)
            gen = make_generator(self.seed, self.stream, step, "flip", device=self.device)
            flip = torch.rand(len(idx), generator=gen, device=self.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if self.crop_padding > 0:
            images = _random_crop(images, self.crop_offsets(step), self.crop_padding)
        return images, labels


def _random_crop(images: torch.Tensor, offsets: torch.Tensor, padding: int) -> torch.Tensor:
    """Crops of the edge-replicated, `padding`-padded images at per-image offsets (B x 2: dy, dx).

    Equal to ``F.pad(images, (p,) * 4, mode="replicate")[i, :, dy:dy + H, dx:dx + W]`` for each image i:
    padded pixel (y, x) is source pixel (clamp(y - p, 0, H - 1), clamp(x - p, 0, W - 1)), so each crop
    is a gather of rows and then of columns, all images at once.
    """
    B, C, H, W = images.shape
    offsets = offsets.to(images.device)
    rows = (torch.arange(H, device=images.device) + offsets[:, :1] - padding).clamp_(0, H - 1)  # B x H
    cols = (torch.arange(W, device=images.device) + offsets[:, 1:] - padding).clamp_(0, W - 1)  # B x W
    images = images.gather(2, rows[:, None, :, None].expand(B, C, H, W))
    return images.gather(3, cols[:, None, None, :].expand(B, C, H, W))
