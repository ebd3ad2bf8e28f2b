"""Hugging Face `datasets` on this machine as image sets and text corpora (the optional extra diffusionblocks[hf]).

A dataset is opened from a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
(``hf_format="disk"``: `load_from_disk`, its Arrow files memory-mapped, nothing copied), or built from local
data files by one of the packaged builders (``hf_format`` "parquet", "json", "csv" or "imagefolder"), never from
the Hub. Rows are read by index (`Dataset.__getitem__` over slices of rows) or in order (`Dataset.iter`), so
what a run trains on is a pure function of the files and the config.
"""

from __future__ import annotations

import glob
import io
import logging
from pathlib import Path
from types import ModuleType

import numpy as np

from . import extras
from .config import ConfigError, shown_path
from .image_folder import check_memory, check_model_shape, fit_image, pillow

logger = logging.getLogger(__name__)

HF_FORMATS = ("disk", "parquet", "json", "csv", "imagefolder")
_SUFFIXES = {"parquet": (".parquet",), "json": (".json", ".jsonl"), "csv": (".csv",)}
_ROWS_PER_READ = 256  # rows decoded per slice read


def _datasets() -> ModuleType:
    """Hugging Face datasets, imported on first use (the optional extra diffusionblocks[hf])."""
    return extras.load("datasets", "data.dataset='hf' / data.format='hf'")


def _data_files(path: str, fmt: str, field: str) -> list[str]:
    """The local files a builder reads: a file, a glob, or the files of a folder with the format's suffix."""
    p = Path(path).expanduser()
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(str(p), recursive=True))
    elif p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in _SUFFIXES[fmt])
    else:
        files = [str(p)] if p.is_file() else []
    if not files:
        raise ConfigError(f"{field} {shown_path(path)} names no {fmt} file (a file, a glob, or a folder of "
                          f"{'/'.join(_SUFFIXES[fmt])} files)")
    return files


def open_dataset(path: str | None, fmt: str, field: str):
    """The Dataset or DatasetDict at `path` (the config field `field`), opened as hf_format `fmt` says."""
    ds = _datasets()
    if not path:
        raise ConfigError(f"{field} must name the dataset (a save_to_disk folder, or data files)")
    p = Path(path).expanduser()
    if fmt == "disk":
        if not p.is_dir():
            raise ConfigError(f"{field} {shown_path(path)} is not a folder written by save_to_disk "
                              "(data.hf_format='disk'; parquet/json/csv/imagefolder read data files)")
        try:
            return ds.load_from_disk(str(p), keep_in_memory=False)  # memory-mapped Arrow files
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{field} {shown_path(path)} is not a dataset written by save_to_disk: {e}") from None
    if fmt == "imagefolder":
        if not p.is_dir():
            raise ConfigError(f"{field} {shown_path(path)} is not a folder (data.hf_format='imagefolder')")
        return ds.load_dataset("imagefolder", data_dir=str(p))
    try:
        return ds.load_dataset(fmt, data_files=_data_files(path, fmt, field))
    except (ValueError, TypeError, ds.exceptions.DatasetGenerationError) as e:
        raise ConfigError(f"{field} {shown_path(path)}: the {fmt} builder cannot read it: {e}") from None


def select_split(dataset, split: str, field: str, what: str):
    """The Dataset of split `split` (the config field `field`) of a DatasetDict; a Dataset is its own split."""
    if isinstance(dataset, _datasets().DatasetDict):
        if split not in dataset:
            raise ConfigError(f"{field}={split!r} is not a split of {what}; it has {', '.join(map(repr, dataset))}")
        return dataset[split]
    if split not in ("", "train"):
        raise ConfigError(f"{field}={split!r}: {what} is a single Dataset, without splits (leave {field} "
                          "'train', or \"\" for a held-out split)")
    return dataset


def check_column(dataset, column: str, field: str, what: str) -> None:
    """One message listing the columns there are, when `column` is not one of them."""
    if column not in dataset.column_names:
        raise ConfigError(f"{field}={column!r} is not a column of {what}; its columns are "
                          f"{', '.join(map(repr, dataset.column_names))}")


def label_names(dataset, column: str) -> tuple[str, ...]:
    """The class names of a label column: a ClassLabel's names, the sorted distinct strings, or 0..max for ints."""
    feature = dataset.features[column]
    if isinstance(feature, _datasets().ClassLabel):
        return tuple(feature.names)
    values = dataset.unique(column)
    if all(isinstance(v, str) for v in values):
        return tuple(sorted(values))
    if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        return tuple(str(k) for k in range(max(values) + 1))
    raise ConfigError(f"data.label_column={column!r} holds {feature}: labels must be class names (strings), "
                      "non-negative integers or a ClassLabel")


def _as_pillow(value, where: str):
    """A row's image value as a Pillow image: decoded already (an Image feature), or an array of pixels."""
    Image = pillow("data.dataset='hf'")
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    a = np.asarray(value)
    if a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 3, 4))):
        return Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a)
    raise ConfigError(f"{where} is not an image (a datasets Image, or uint8 H x W [x C] pixels): got "
                      f"{type(value).__name__} {getattr(a, 'shape', '')}")


def read_images(dataset, indices: np.ndarray, image_column: str, label_column: str, classes: tuple[str, ...],
                image_size: int, channels: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows `indices` (random access) as (uint8 N x C x H x W images fitted to the model, int64 labels)."""
    images = np.empty((len(indices), channels, image_size, image_size), dtype=np.uint8)
    labels = np.zeros(len(indices), dtype=np.int64)
    index = {name: k for k, name in enumerate(classes)}
    columns = [image_column, *([label_column] if label_column else [])]
    rows = dataset.select_columns(columns)
    for start in range(0, len(indices), _ROWS_PER_READ):
        chunk = [int(i) for i in indices[start:start + _ROWS_PER_READ]]
        batch = rows[chunk]
        for j, value in enumerate(batch[image_column]):
            where = f"row {chunk[j]} of {what}, column {image_column!r}"
            try:
                images[start + j] = fit_image(_as_pillow(value, where), image_size, channels)
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read the image of {where}: {e}") from None
        if label_column:
            for j, y in enumerate(batch[label_column]):
                if isinstance(y, str) and y not in index:
                    raise ConfigError(f"row {chunk[j]} of {what}: label {y!r} is not among the classes of "
                                      f"data.hf_split ({', '.join(classes)})")
                labels[start + j] = index[y] if isinstance(y, str) else y
    return images, labels


def open_parts(path: str | None, fmt: str, path_field: str, split: str, test_split: str,
               columns: dict[str, str]) -> tuple[list, str]:
    """([train part, test part when test_split is not ""], the dataset as messages name it), each part checked to have
    the columns named by `columns` (config field -> column)."""
    opened = open_dataset(path, fmt, path_field)
    what = f"the dataset {shown_path(path)}"
    parts = [select_split(opened, split, "data.hf_split", what)]
    if test_split:
        parts.append(select_split(opened, test_split, "data.hf_test_split", what))
    for part in parts:
        for field, column in columns.items():
            check_column(part, column, field, what)
    return parts, what


def load_hf_images(path: str | None, fmt: str, split: str, test_split: str, image_column: str, label_column: str,
                   image_size: int | None, channels: int | None, memory_limit_gb: float):
    """(train, test, classes) of a Hugging Face image dataset, each part (uint8 images, int64 labels), or test None
    when test_split is "" (the caller holds out part of train). Images are decoded once, by row index."""
    image_size, channels = check_model_shape(image_size, channels, "data.dataset='hf'")
    columns = {"data.image_column": image_column, **({"data.label_column": label_column} if label_column else {})}
    parts, what = open_parts(path, fmt, "data.root", split, test_split, columns)
    classes = label_names(parts[0], label_column) if label_column else ()
    check_memory(sum(len(p) for p in parts), image_size, channels, memory_limit_gb, what)
    read = [read_images(p, np.arange(len(p)), image_column, label_column, classes, image_size, channels, what)
            for p in parts]
    logger.info("%s: %s images, %s", what, " + ".join(str(len(p)) for p in parts),
                f"{len(classes)} classes: {', '.join(classes)}" if classes else "no labels (unconditional)")
    return read[0], (read[1] if test_split else None), classes


def read_texts(dataset, column: str, separator: str, what: str) -> str:
    """The strings of a text column in row order, joined by separator (read in slices: only the result is held)."""
    out = io.StringIO()
    first = True
    for batch in dataset.select_columns([column]).iter(batch_size=1000):
        for text in batch[column]:
            if not isinstance(text, str):
                raise ConfigError(f"data.text_column={column!r} of {what} holds {type(text).__name__}, not text")
            if not first:
                out.write(separator)
            out.write(text)
            first = False
    return out.getvalue()


def load_hf_text(path: str | None, fmt: str, split: str, test_split: str, column: str,
                 separator: str) -> tuple[str, str | None]:
    """(training text, held-out text or None when test_split is "") of a Hugging Face text dataset."""
    parts, what = open_parts(path, fmt, "data.path", split, test_split, {"data.text_column": column})
    texts = [read_texts(p, column, separator, what) for p in parts]
    return texts[0], (texts[1] if test_split else None)
