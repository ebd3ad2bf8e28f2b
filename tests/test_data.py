"""Tests of the datasets, the deterministic batch sampler and the seed derivation."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import logging
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusionblocks import data as data_mod
from diffusionblocks.config import ConfigError
from diffusionblocks.data import BatchSampler, DataConfig, ImageData, ImageSplits, load_image_data
from diffusionblocks.seeding import derive_seed, make_generator

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


# ----------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits() -> ImageSplits:
    return load_image_data(DataConfig(dataset="digits"))


def test_digits_shapes_and_range(digits: ImageSplits) -> None:
    tr, te = digits.train, digits.test
    assert (len(tr), len(te)) == (1500, 297)
    assert tr.images.shape == (1500, 1, 8, 8) and te.images.shape == (297, 1, 8, 8)
    assert tr.images.dtype == torch.float32 and tr.labels.dtype == torch.int64
    assert tr.num_channels == 1 and tr.image_size == 8 and tr.num_classes == 10
    both = torch.cat([tr.images, te.images])
    assert both.min().item() == -1.0 and both.max().item() == 1.0
    # 17 grey levels 0..16 map to x/8 - 1
    assert torch.allclose((both + 1) * 8, ((both + 1) * 8).round())
    assert set(torch.cat([tr.labels, te.labels]).tolist()) == set(range(10))


def _rows(d: ImageData) -> list[tuple[float, ...]]:
    return sorted(tuple(x.tolist()) + (float(y),) for x, y in zip(d.images.flatten(1), d.labels))


def test_digits_split_disjoint_and_fixed(digits: ImageSplits) -> None:
    again = load_image_data(DataConfig(dataset="digits"))
    assert torch.equal(again.train.images, digits.train.images)
    assert torch.equal(again.test.labels, digits.test.labels)
    from sklearn.datasets import load_digits
    ref = load_digits()
    ref_rows = sorted(tuple((row / 8 - 1).tolist()) + (float(y),) for row, y in zip(ref.data, ref.target))
    # train and test together hold every image exactly once (as a multiset): a partition, no overlap
    assert sorted(_rows(digits.train) + _rows(digits.test)) == ref_rows


def test_digits_holdout_and_errors() -> None:
    s = load_image_data(DataConfig(dataset="digits", holdout=100))
    assert (len(s.train), len(s.test)) == (1697, 100)
    with pytest.raises(ConfigError, match="one split"):
        load_image_data(DataConfig(dataset="digits", split="test"))
    with pytest.raises(ConfigError, match="holdout"):
        load_image_data(DataConfig(dataset="digits", holdout=5000))
    with pytest.raises(ConfigError, match="data.dataset"):
        load_image_data(DataConfig(dataset="imagenet"))


# ----------------------------------------------------------------------------------------------
# MNIST


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write(path: Path, payload: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def _fake_mnist(root: Path, gz: bool, n_train: int = 6, n_test: int = 5,
                size: int = 28) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    arrays["train-images-idx3-ubyte"][0, 0, :3] = [0, 255, 51]  # known pixels
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        _write(root / name, _idx_bytes(arr, 0x803 if arr.ndim == 3 else 0x801), gz)
    return arrays


def _mnist(root: Path, **kw: object) -> ImageSplits:
    return load_image_data(DataConfig(dataset="mnist", root=str(root), **kw))  # type: ignore[arg-type]


def test_mnist_shared_test_split() -> None:
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no MNIST files at {SHARED_MNIST}")
    s = _mnist(SHARED_MNIST, split="test")
    assert (len(s.train), len(s.test)) == (8000, 2000)
    assert s.train.images.shape[1:] == (1, 28, 28) and s.train.image_size == 28
    assert s.train.images.min().item() == -1.0 and s.train.images.max().item() == 1.0
    assert set(s.test.labels.tolist()) == set(range(10))
    again = _mnist(SHARED_MNIST, split="test")
    assert torch.equal(again.test.images, s.test.images)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_synthetic_parses_exactly(tmp_path: Path, gz: bool) -> None:
    arrays = _fake_mnist(tmp_path, gz)
    s = _mnist(tmp_path)
    assert s.train.images.shape == (6, 1, 28, 28) and s.test.images.shape == (5, 1, 28, 28)
    expect = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float() / 127.5 - 1
    assert torch.equal(s.train.images[:, 0], expect)
    assert s.train.images[0, 0, 0, :3].tolist() == pytest.approx([-1.0, 1.0, 51 / 127.5 - 1], abs=1e-6)
    assert s.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert s.test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert s.train.labels.dtype == torch.int64 and s.train.num_classes == 10


def test_mnist_synthetic_test_split(tmp_path: Path) -> None:
    arrays = _fake_mnist(tmp_path, gz=True, n_test=10)
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()  # split="test" needs only the t10k files
    s = _mnist(tmp_path, split="test", holdout=3)
    assert (len(s.train), len(s.test)) == (7, 3)
    all_imgs = torch.cat([s.train.images, s.test.images])[:, 0]
    ref = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float() / 127.5 - 1
    # the two parts together are a permutation of the file's images
    assert sorted(map(tuple, all_imgs.flatten(1).tolist())) == sorted(map(tuple, ref.flatten(1).tolist()))


def test_mnist_prefers_existing_plain_or_gz(tmp_path: Path) -> None:
    _fake_mnist(tmp_path, gz=True)
    plain = _fake_mnist(tmp_path / "p", gz=False, n_train=4)
    for name in MNIST_NAMES[:2]:  # plain train files next to the .gz ones: plain wins
        (tmp_path / name).write_bytes((tmp_path / "p" / name).read_bytes())
    s = _mnist(tmp_path)
    assert len(s.train) == 4 and s.train.labels.tolist() == plain["train-labels-idx1-ubyte"].tolist()


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_truncated_file(tmp_path: Path, gz: bool) -> None:
    _fake_mnist(tmp_path, gz=False)
    name = "t10k-images-idx3-ubyte"
    raw = (tmp_path / name).read_bytes()
    (tmp_path / name).unlink()
    if gz:
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(raw)[:-30])  # cut gzip stream
    else:
        (tmp_path / name).write_bytes(raw[:-100])
    with pytest.raises(ConfigError, match=name):
        _mnist(tmp_path)


def test_mnist_wrong_magic_and_count_mismatch(tmp_path: Path) -> None:
    arrays = _fake_mnist(tmp_path, gz=False)
    name = "train-labels-idx1-ubyte"
    (tmp_path / name).write_bytes(_idx_bytes(arrays[name], 0x803)[:8] + arrays[name].tobytes())
    with pytest.raises(ConfigError, match=f"{name}.*magic"):
        _mnist(tmp_path)
    (tmp_path / name).write_bytes(_idx_bytes(arrays[name][:-1], 0x801))
    with pytest.raises(ConfigError, match="do not match"):
        _mnist(tmp_path)
    (tmp_path / name).write_bytes(_idx_bytes(np.full(6, 12, np.uint8), 0x801))
    with pytest.raises(ConfigError, match="labels outside"):
        _mnist(tmp_path)


def test_mnist_missing_file_and_root(tmp_path: Path) -> None:
    _fake_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ConfigError, match=r"t10k-labels-idx1-ubyte.*data\.download=true"):
        _mnist(tmp_path)
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match="does not exist"):
        _mnist(missing)
    with pytest.raises(ConfigError, match="data.root is required"):
        load_image_data(DataConfig(dataset="mnist"))


class _FakeResponse(io.BytesIO):
    def __enter__(self) -> _FakeResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_mnist_download_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    _fake_mnist(src, gz=True, n_test=4)
    served: dict[str, bytes] = {}
    for name in MNIST_NAMES:
        payload = (src / f"{name}.gz").read_bytes()
        served[data_mod.MNIST_MIRRORS[1] + f"{name}.gz"] = payload  # first mirror is down
        monkeypatch.setitem(data_mod._MNIST_FILES, name, hashlib.md5(payload).hexdigest())
    requested = []

    def fake_urlopen(url: str, timeout: float) -> _FakeResponse:
        requested.append(url)
        if url not in served:
            raise OSError("connection refused")
        return _FakeResponse(served[url])

    monkeypatch.setattr(data_mod.urllib.request, "urlopen", fake_urlopen)
    root = tmp_path / "new" / "mnist"
    s = _mnist(root, download=True, split="test", holdout=1)
    assert (len(s.train), len(s.test)) == (3, 1)
    assert sorted(os.listdir(root)) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert requested[0].startswith(data_mod.MNIST_MIRRORS[0])
    # a download that does not match its checksum is refused and leaves nothing behind
    monkeypatch.setitem(data_mod._MNIST_FILES, "train-images-idx3-ubyte", "0" * 32)
    with pytest.raises(ConfigError, match="train-images-idx3-ubyte.gz.*md5"):
        _mnist(root, download=True)
    assert not any(n.startswith("train-images") or n.endswith(".part") for n in os.listdir(root))


# ----------------------------------------------------------------------------------------------
# CIFAR-10


def _fake_cifar_batch(path: Path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"fake", b"labels": labels, b"data": data, b"filenames": []}, f)
    return data, labels


def _fake_cifar(folder: Path, n: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {name: _fake_cifar_batch(folder / name, n if name != "test_batch" else 2 * n, i)
            for i, name in enumerate(names)}


def _cifar(root: Path, dataset: str = "cifar10", **kw: object) -> ImageSplits:
    return load_image_data(DataConfig(dataset=dataset, root=str(root), **kw))  # type: ignore[arg-type]


def _assert_channel_major(img: torch.Tensor, row: np.ndarray) -> None:
    """img (3, 32, 32) is the pickle row: 1024 red, then 1024 green, then 1024 blue, each row-major 32x32."""
    for c in range(3):
        for (y, x) in [(0, 0), (0, 31), (5, 7), (31, 0)]:
            assert img[c, y, x].item() == pytest.approx(row[c * 1024 + y * 32 + x] / 127.5 - 1, abs=1e-6)


def _tar_gz(folder: Path) -> bytes:
    """The bytes of a .tar.gz holding folder under its own name, as the CIFAR archives do."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return buf.getvalue()


def test_cifar10_synthetic_layout(tmp_path: Path) -> None:
    batches = _fake_cifar(tmp_path / "cifar-10-batches-py")
    s = _cifar(tmp_path)
    assert s.train.images.shape == (15, 3, 32, 32) and s.test.images.shape == (6, 3, 32, 32)
    assert s.train.num_channels == 3 and s.train.image_size == 32
    data, labels = batches["data_batch_2"]
    _assert_channel_major(s.train.images[3], data[0])  # the first image of data_batch_2
    assert s.train.labels[3:6].tolist() == labels
    assert s.test.labels.tolist() == batches["test_batch"][1]
    assert s.train.images.min() >= -1 and s.train.images.max() <= 1


def test_cifar10_files_directly_in_root_and_test_split(tmp_path: Path) -> None:
    _fake_cifar(tmp_path, n=2)
    s = _cifar(tmp_path, split="test", holdout=1)
    assert (len(s.train), len(s.test)) == (3, 1)


def test_cifar10_errors(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _fake_cifar(folder)
    (folder / "data_batch_4").unlink()
    with pytest.raises(ConfigError, match=r"data_batch_4.*data\.download=true"):
        _cifar(tmp_path)
    (folder / "data_batch_4").write_bytes((folder / "data_batch_3").read_bytes()[:200])
    with pytest.raises(ConfigError, match="data_batch_4"):
        _cifar(tmp_path)
    # a pickle that would run code is refused
    (folder / "data_batch_4").write_bytes(pickle.dumps(os.getcwd))
    with pytest.raises(ConfigError, match="data_batch_4.*forbidden"):
        _cifar(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        _cifar(tmp_path / "missing")


def test_cifar10_download_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cifar(tmp_path / "src" / "cifar-10-batches-py", n=2)
    payload = _tar_gz(tmp_path / "src" / "cifar-10-batches-py")
    monkeypatch.setitem(data_mod._CIFAR_SPECS, "cifar10",
                        dataclasses.replace(data_mod.CIFAR10, md5=hashlib.md5(payload).hexdigest()))
    monkeypatch.setattr(data_mod.urllib.request, "urlopen", lambda url, timeout: _FakeResponse(payload))
    root = tmp_path / "dl"
    s = _cifar(root, download=True)
    assert (len(s.train), len(s.test)) == (10, 4)
    assert sorted(os.listdir(root)) == ["cifar-10-batches-py"]


# ----------------------------------------------------------------------------------------------
# CIFAR-100


def _fake_cifar100_file(path: Path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 100, n).tolist()
    labels[0] = 99  # the top fine class must be accepted
    with open(path, "wb") as f:
        pickle.dump({b"filenames": [], b"batch_label": b"fake", b"fine_labels": labels,
                     b"coarse_labels": [y // 5 for y in labels], b"data": data}, f)
    return data, labels


def _fake_cifar100(folder: Path, n: int = 5) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True, exist_ok=True)
    return {"train": _fake_cifar100_file(folder / "train", n, 1),
            "test": _fake_cifar100_file(folder / "test", 2 * n, 2)}


def _cifar100(root: Path, **kw: object) -> ImageSplits:
    return _cifar(root, "cifar100", **kw)


def test_cifar100_synthetic_layout(tmp_path: Path) -> None:
    files = _fake_cifar100(tmp_path / "cifar-100-python")
    s = _cifar100(tmp_path)
    assert s.train.images.shape == (5, 3, 32, 32) and s.test.images.shape == (10, 3, 32, 32)
    assert s.train.num_classes == 100 and s.test.num_classes == 100
    assert (s.train.name, s.test.name) == ("cifar100-train", "cifar100-test")
    data, labels = files["train"]
    _assert_channel_major(s.train.images[2], data[2])
    assert s.train.labels.tolist() == labels and s.test.labels.tolist() == files["test"][1]
    assert s.train.labels.max().item() == 99


def test_cifar100_files_directly_in_root_and_test_split(tmp_path: Path) -> None:
    files = _fake_cifar100(tmp_path, n=4)
    (tmp_path / "train").unlink()  # split="test" needs only the test file
    s = _cifar100(tmp_path, split="test", holdout=3)
    assert (len(s.train), len(s.test)) == (5, 3) and s.train.num_classes == 100
    assert sorted(s.train.labels.tolist() + s.test.labels.tolist()) == sorted(files["test"][1])


def test_cifar100_errors(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    _fake_cifar100(folder)
    (folder / "test").unlink()
    with pytest.raises(ConfigError, match=r"CIFAR-100 file\(s\) missing.*: test; data\.download=true"):
        _cifar100(tmp_path)
    # a CIFAR-10-style pickle (b"labels", no b"fine_labels") is refused, naming dataset, file and entry
    _fake_cifar_batch(folder / "test", 3, 0)
    with pytest.raises(ConfigError, match=r"CIFAR-100 file '.*test' lacks .*fine_labels"):
        _cifar100(tmp_path)
    (folder / "test").write_bytes(pickle.dumps(os.getcwd))
    with pytest.raises(ConfigError, match="CIFAR-100 file.*forbidden"):
        _cifar100(tmp_path)
    _fake_cifar100_file(folder / "test", 3, 0)
    with open(folder / "train", "wb") as f:  # a label outside 0..99
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}, f)
    with pytest.raises(ConfigError, match=r"CIFAR-100 file '.*train' has labels outside 0\.\.99"):
        _cifar100(tmp_path)


def test_cifar100_download_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cifar100(tmp_path / "src" / "cifar-100-python", n=3)
    payload = _tar_gz(tmp_path / "src" / "cifar-100-python")
    urls: list[str] = []

    def urlopen(url: str, timeout: float) -> _FakeResponse:
        urls.append(url)
        return _FakeResponse(payload)

    monkeypatch.setitem(data_mod._CIFAR_SPECS, "cifar100",
                        dataclasses.replace(data_mod.CIFAR100, md5=hashlib.md5(payload).hexdigest()))
    monkeypatch.setattr(data_mod.urllib.request, "urlopen", urlopen)
    s = _cifar100(tmp_path / "dl", download=True)
    assert (len(s.train), len(s.test)) == (3, 6)
    assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"]
    assert sorted(os.listdir(tmp_path / "dl")) == ["cifar-100-python"]
    monkeypatch.setitem(data_mod._CIFAR_SPECS, "cifar100", data_mod.CIFAR100)  # the real md5 does not match
    with pytest.raises(ConfigError, match="cifar-100-python.tar.gz.*md5"):
        _cifar100(tmp_path / "dl2", download=True)


def test_cifar_specs() -> None:
    assert data_mod.CIFAR100.md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    assert data_mod.CIFAR100.archive == "cifar-100-python.tar.gz"
    assert data_mod.CIFAR10.archive == "cifar-10-python.tar.gz"
    with pytest.raises(dataclasses.FrozenInstanceError):
        data_mod.CIFAR100.num_classes = 10  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------
# BatchSampler


def _toy(n: int = 24) -> ImageData:
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    images[:, :, :, 1] += 0.5  # makes flips visible
    return ImageData(images, torch.arange(n) % 10, 10, "toy")


def test_sampler_deterministic_and_streams() -> None:
    data = _toy()
    a, b = BatchSampler(data, 8, seed=3, stream=0), BatchSampler(data, 8, seed=3, stream=0)
    for step in (0, 1, 7, 100):
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (8, 1, 2, 2) and ya.dtype == torch.int64
    other = BatchSampler(data, 8, seed=3, stream=1)
    assert not torch.equal(a.indices(0), other.indices(0))
    assert not torch.equal(a.indices(0), BatchSampler(data, 8, seed=4, stream=0).indices(0))


def test_sampler_epoch_covers_every_index_once() -> None:
    data = _toy(24)
    s = BatchSampler(data, 6, seed=0, stream=2)
    for epoch in range(3):
        idx = torch.cat([s.indices(epoch * 4 + k) for k in range(4)])
        assert sorted(idx.tolist()) == list(range(24))
        labels = torch.cat([s.batch(epoch * 4 + k)[1] for k in range(4)])
        assert torch.equal(labels, data.labels[idx])
    assert not torch.equal(s.indices(0), s.indices(4))  # each epoch reshuffles


def test_sampler_history_independent_and_large_batches() -> None:
    data = _toy(10)
    forward = BatchSampler(data, 7, seed=1, stream=0)
    expected = [forward.batch(k)[0] for k in range(12)]
    backward = BatchSampler(data, 7, seed=1, stream=0)
    for k in [11, 3, 0, 9, 5, 11, 1, 2, 4, 6, 7, 8, 10]:
        assert torch.equal(backward.batch(k)[0], expected[k])
    # the stream is the concatenation of epoch permutations: 7-batches straddle epochs of 10
    stream = torch.cat([forward.indices(k) for k in range(10)])
    for e in range(7):
        assert sorted(stream[10 * e: 10 * (e + 1)].tolist()) == list(range(10))
    big = BatchSampler(data, 25, seed=1, stream=0)  # batch larger than the data
    idx = big.indices(1)
    assert len(idx) == 25 and torch.equal(idx, torch.cat([forward.indices(k) for k in range(10)])[25:50])


def test_sampler_hflip() -> None:
    data = _toy(64)
    s = BatchSampler(data, 64, seed=0, stream=0, hflip=True)
    x, _ = s.batch(5)
    idx = s.indices(5)
    orig = data.images[idx]
    flipped = (x != orig).flatten(1).any(1)
    assert torch.equal(x[flipped], orig[flipped].flip(-1))
    assert 10 < int(flipped.sum()) < 54
    assert torch.equal(x, s.batch(5)[0])
    assert torch.equal(data.images, _toy(64).images)  # the dataset itself is never modified


def _distinct(n: int = 32, c: int = 2, size: int = 5) -> ImageData:
    images = torch.arange(n * c * size * size, dtype=torch.float32).view(n, c, size, size)
    return ImageData(images, torch.arange(n) % 10, 10, "distinct")


def test_sampler_crop_zero_is_identity() -> None:
    data = _distinct()
    plain, zero = BatchSampler(data, 16, seed=2, stream=1), BatchSampler(data, 16, seed=2, stream=1, crop_padding=0)
    for step in (0, 3):
        assert torch.equal(zero.batch(step)[0], data.images[zero.indices(step)])
        assert torch.equal(zero.batch(step)[0], plain.batch(step)[0])


@pytest.mark.parametrize("p", [1, 2, 4, 7])
def test_sampler_crop_matches_padded_window(p: int) -> None:
    data = _distinct(size=5)  # p=7 pads by more than the image size
    s = BatchSampler(data, 48, seed=0, stream=3, crop_padding=p)
    for step in (0, 5):
        x, y = s.batch(step)
        idx = s.indices(step)
        off = s.crop_offsets(step)
        assert x.shape == (48, 2, 5, 5) and torch.equal(y, data.labels[idx])
        assert off.min() >= 0 and off.max() <= 2 * p
        padded = torch.nn.functional.pad(data.images[idx], (p, p, p, p), mode="replicate")
        for i in range(len(idx)):
            dy, dx = off[i].tolist()
            assert torch.equal(x[i], padded[i, :, dy:dy + 5, dx:dx + 5])
    assert torch.equal(data.images, _distinct(size=5).images)  # the dataset itself is never modified


def test_sampler_crop_deterministic_and_history_independent() -> None:
    data = _distinct()
    a = BatchSampler(data, 16, seed=4, stream=0, crop_padding=2)
    expected = [a.batch(k)[0] for k in range(8)]
    b = BatchSampler(data, 16, seed=4, stream=0, crop_padding=2)
    for k in [7, 2, 0, 5, 7, 1, 3, 6, 4]:
        assert torch.equal(b.batch(k)[0], expected[k])
    assert not torch.equal(a.crop_offsets(0), a.crop_offsets(1))
    assert not torch.equal(a.crop_offsets(0), BatchSampler(data, 16, seed=4, stream=1, crop_padding=2).crop_offsets(0))
    # crops are drawn from their own generator: the indices do not change with crop_padding
    assert torch.equal(a.indices(3), BatchSampler(data, 16, seed=4, stream=0).indices(3))


def test_sampler_crop_offsets_cover_range() -> None:
    p = 3
    s = BatchSampler(_distinct(), 16, seed=1, stream=0, crop_padding=p)
    off = torch.cat([s.crop_offsets(k) for k in range(40)])  # 640 images
    for axis in (0, 1):
        assert off[:, axis].min().item() == 0 and off[:, axis].max().item() == 2 * p
        assert set(off[:, axis].tolist()) == set(range(2 * p + 1))
    assert (off == p).all(1).float().mean() < 0.1  # mostly not the identity crop


def test_sampler_crop_with_hflip() -> None:
    data = _distinct(64)
    both = BatchSampler(data, 64, seed=0, stream=0, hflip=True, crop_padding=2)
    flip_only = BatchSampler(data, 64, seed=0, stream=0, hflip=True)
    x, flipped = both.batch(3)[0], flip_only.batch(3)[0]
    padded = torch.nn.functional.pad(flipped, (2, 2, 2, 2), mode="replicate")
    off = both.crop_offsets(3)
    for i in range(64):  # the flip first (same draws as without crops), then the crop
        dy, dx = off[i].tolist()
        assert torch.equal(x[i], padded[i, :, dy:dy + 5, dx:dx + 5])


def test_crop_padding_config(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="diffusionblocks.data"):
        s = load_image_data(DataConfig(dataset="digits", crop_padding=1))
    assert len(s.train) == 1500
    assert any("crop_padding" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    with pytest.raises(ConfigError, match="crop_padding"):
        load_image_data(DataConfig(dataset="digits", crop_padding=-1))
    with pytest.raises(ValueError, match="crop_padding"):
        BatchSampler(_toy(), 4, seed=0, stream=0, crop_padding=-1)


def test_sampler_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        BatchSampler(_toy(), 0, seed=0, stream=0)
    with pytest.raises(ValueError):
        BatchSampler(_toy(), 4, seed=0, stream=0).batch(-1)


# ----------------------------------------------------------------------------------------------
# seeds


def test_derive_seed() -> None:
    assert derive_seed(0, 1, 2, "noise") == derive_seed(0, 1, 2, "noise")
    variants = [(0, 1, 2, "noise"), (0, 1, 2, "perm"), (0, 2, 1, "noise"), (1, 23), (12, 3), (123,),
                ("123",), (-1,), (1,), (0,), (), ("",), (0, 0), (2**70,), ("a", "b"), ("ab",)]
    seeds = [derive_seed(*v) for v in variants]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)
    # pinned value: it must not depend on the process (no salted hash()) nor change between versions
    assert derive_seed(0, 1, 2, "perm") == 3938233045825533766
    with pytest.raises(TypeError):
        derive_seed(1.5)  # type: ignore[arg-type]


def test_make_generator() -> None:
    a = torch.rand(4, generator=make_generator(7, "x"))
    b = torch.rand(4, generator=make_generator(7, "x"))
    c = torch.rand(4, generator=make_generator(7, "y"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert make_generator(7, "x").initial_seed() == derive_seed(7, "x")


def test_image_data_validation() -> None:
    with pytest.raises(ValueError):
        ImageData(torch.zeros(3, 1, 4, 4), torch.zeros(2, dtype=torch.int64), 10, "bad")
    with pytest.raises(ValueError):
        ImageData(torch.zeros(3, 1, 4, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), 10, "bad")
    with pytest.raises(ValueError):
        ImageData(torch.zeros(3, 1, 4, 5), torch.zeros(3, dtype=torch.int64), 10, "bad").image_size
