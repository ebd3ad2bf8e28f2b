"""Tests of the reference classifier: accuracy on digits, determinism, shapes and the weights cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusionblocks import reference as ev
from diffusionblocks.data import DataConfig, ImageData, ImageSplits, load_image_data
from diffusionblocks.reference import (ReferenceClassifier, accuracy, conditional_accuracy, data_fingerprint,
                                       load_or_train_reference_classifier, predict, random_shift,
                                       train_reference_classifier)
from diffusionblocks.seeding import make_generator

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def digits() -> ImageSplits:
    return load_image_data(DataConfig(dataset="digits"))


@pytest.fixture(scope="module")
def small(digits: ImageSplits) -> ImageData:
    """200 training digits, enough for the few-step tests."""
    return ImageData(digits.train.images[:200], digits.train.labels[:200], 10, "digits-train")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------
# Accuracy and metrics


def test_digits_held_out_accuracy(digits: ImageSplits) -> None:
    clf = train_reference_classifier(digits.train, seed=0)  # default steps
    assert not clf.training
    acc = accuracy(clf, digits.test.images, digits.test.labels)
    assert acc >= 0.95, acc
    assert conditional_accuracy(clf, digits.test.images, digits.test.labels) == acc
    preds = predict(clf, digits.test.images, batch_size=64)
    assert preds.dtype == torch.int64 and preds.shape == (len(digits.test),)
    assert torch.equal(preds, predict(clf, digits.test.images))  # batching does not change the result
    # Requesting the wrong class for every image gives a low conditional accuracy.
    wrong = (digits.test.labels + 1) % 10
    assert conditional_accuracy(clf, digits.test.images, wrong) < 0.05


def test_metrics_edge_cases() -> None:
    clf = ReferenceClassifier(1, 10)
    empty = predict(clf, torch.zeros(0, 1, 8, 8))
    assert empty.dtype == torch.int64 and empty.shape == (0,)
    with pytest.raises(ValueError):
        accuracy(clf, torch.zeros(3, 1, 8, 8), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError):
        accuracy(clf, torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------
# Model and determinism


@pytest.mark.parametrize("channels,size", [(1, 8), (1, 28), (3, 32)])
def test_shapes(channels: int, size: int) -> None:
    x = torch.rand(5, channels, size, size, generator=make_generator(1, "x")) * 2 - 1
    for feature_dim in (128, 64):
        clf = ReferenceClassifier(channels, 10, feature_dim=feature_dim, generator=make_generator(0, "init"))
        assert clf.features(x).shape == (5, feature_dim)
        assert clf(x).shape == (5, 10)
        assert torch.isfinite(clf(x)).all()
    with pytest.raises(ValueError):
        clf(torch.zeros(5, channels + 1, size, size))


def test_init_deterministic_and_leaves_global_rng_alone(small: ImageData) -> None:
    state = torch.random.get_rng_state()
    a = ReferenceClassifier(3, 10, generator=make_generator(5, "init"))
    b = ReferenceClassifier(3, 10, generator=make_generator(5, "init"))
    c = ReferenceClassifier(3, 10, generator=make_generator(6, "init"))
    assert _same_weights(a, b) and not _same_weights(a, c)
    assert _same_weights(ReferenceClassifier(3, 10), ReferenceClassifier(3, 10))  # default generator is fixed
    train_reference_classifier(small, seed=0, steps=2, batch_size=16)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_training_deterministic_given_seed(small: ImageData) -> None:
    a = train_reference_classifier(small, seed=3, steps=20, batch_size=32)
    b = train_reference_classifier(small, seed=3, steps=20, batch_size=32)
    c = train_reference_classifier(small, seed=4, steps=20, batch_size=32)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)
    untrained = ReferenceClassifier(1, 10, generator=make_generator(3, "refclf", "init"))
    assert not _same_weights(a, untrained)


def test_random_shift() -> None:
    x = torch.full((4, 2, 8, 8), -1.0)
    x[:, :, 4, 3] = 1.0  # one bright pixel away from the border
    out = random_shift(x, 1, make_generator(0, "shift"))
    assert out.shape == x.shape
    assert torch.equal(out, random_shift(x, 1, make_generator(0, "shift")))
    assert torch.equal(random_shift(x, 0, make_generator(0, "shift")), x)
    for img in out:
        rows, cols = torch.nonzero(img[0] > 0, as_tuple=True)
        assert len(rows) == 1 and abs(int(rows[0]) - 4) <= 1 and abs(int(cols[0]) - 3) <= 1
        assert torch.equal(img[0], img[1])  # both channels shifted alike
    assert ev.max_shift(8) == 1 and ev.max_shift(28) == 2 and ev.max_shift(32) == 2


# ----------------------------------------------------------------------------------------------
# Fingerprint and cache


def test_data_fingerprint(small: ImageData) -> None:
    fp = data_fingerprint(small)
    assert len(fp) == 64 and int(fp, 16) >= 0
    same = ImageData(small.images.clone(), small.labels.clone(), 10, "another-name")
    assert data_fingerprint(same) == fp
    changed = small.images.clone()
    changed[0, 0, 0, 0] += 0.5
    assert data_fingerprint(ImageData(changed, small.labels, 10, small.name)) != fp
    relabelled = small.labels.clone()
    relabelled[0] = (relabelled[0] + 1) % 10
    assert data_fingerprint(ImageData(small.images, relabelled, 10, small.name)) != fp
    assert data_fingerprint(ImageData(small.images, small.labels, 11, small.name)) != fp


def test_cache_trains_then_loads(small: ImageData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clf, meta = load_or_train_reference_classifier(small, tmp_path, seed=1, steps=5)
    fp = data_fingerprint(small)
    path = tmp_path / f"refclf-digits-train-{fp[:16]}-s1.safetensors"
    assert meta["cached"] is False and Path(meta["path"]) == path and path.is_file()
    assert meta["fingerprint"] == fp and meta["seed"] == 1 and meta["steps"] == 5
    assert (meta["in_channels"], meta["num_classes"], meta["feature_dim"], meta["image_size"]) == (1, 10, 128, 8)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    assert _same_weights(clf, train_reference_classifier(small, seed=1, steps=5))

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded, not retrained")

    monkeypatch.setattr(ev, "train_reference_classifier", no_training)
    again, meta2 = load_or_train_reference_classifier(small, tmp_path, seed=1, steps=5)
    assert meta2["cached"] is True
    assert {k: v for k, v in meta2.items() if k != "cached"} == {k: v for k, v in meta.items() if k != "cached"}
    assert _same_weights(clf, again) and not again.training
    x = small.images[:16]
    assert torch.equal(clf(x), again(x))


def test_corrupt_cache_is_replaced(small: ImageData, tmp_path: Path) -> None:
    _, meta = load_or_train_reference_classifier(small, tmp_path, steps=3)
    path = Path(meta["path"])
    path.write_bytes(b"\x00garbage, not a safetensors file" * 10)
    clf, meta2 = load_or_train_reference_classifier(small, tmp_path, steps=3)
    assert meta2["cached"] is False and Path(meta2["path"]) == path
    assert clf(small.images[:4]).shape == (4, 10)
    assert load_file(str(path)).keys() == clf.state_dict().keys()  # the file is valid again
    _, meta3 = load_or_train_reference_classifier(small, tmp_path, steps=3)
    assert meta3["cached"] is True
    # A truncated file is replaced too.
    path.write_bytes(path.read_bytes()[:100])
    assert load_or_train_reference_classifier(small, tmp_path, steps=3)[1]["cached"] is False


def test_mismatched_cache_is_retrained(small: ImageData, tmp_path: Path) -> None:
    _, meta = load_or_train_reference_classifier(small, tmp_path, steps=3)
    # Other steps requested: the file's steps do not match, so it is retrained and replaced.
    _, meta2 = load_or_train_reference_classifier(small, tmp_path, steps=4)
    assert meta2["cached"] is False and meta2["path"] == meta["path"]
    assert load_or_train_reference_classifier(small, tmp_path, steps=4)[1]["cached"] is True
    # A file whose recorded fingerprint differs from the data's (but with the same name) is retrained.
    other = ImageData(small.images[:50], small.labels[:50], 10, small.name)
    _, meta_other = load_or_train_reference_classifier(other, tmp_path, steps=4)
    Path(meta_other["path"]).replace(meta["path"])
    _, meta3 = load_or_train_reference_classifier(small, tmp_path, steps=4)
    assert meta3["cached"] is False and meta3["fingerprint"] == data_fingerprint(small)


def test_different_data_gives_different_cache_file(small: ImageData, tmp_path: Path) -> None:
    _, meta = load_or_train_reference_classifier(small, tmp_path, steps=3)
    subset = ImageData(small.images[:100], small.labels[:100], 10, small.name)
    _, meta_sub = load_or_train_reference_classifier(subset, tmp_path, steps=3)
    assert meta_sub["cached"] is False and meta_sub["path"] != meta["path"]
    _, meta_seed = load_or_train_reference_classifier(small, tmp_path, seed=7, steps=3)
    assert meta_seed["cached"] is False and meta_seed["path"] != meta["path"]
    assert len(list(tmp_path.glob("refclf-*.safetensors"))) == 3


def test_unwritable_cache_does_not_raise(small: ImageData, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    clf, meta = load_or_train_reference_classifier(small, blocker, steps=2)
    assert meta["cached"] is False and clf(small.images[:2]).shape == (2, 10)
