"""compose: runs made of other runs' blocks; the image domains; fine-tuning on another domain; the domain judge."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY

from diffusionblocks import checkpoint, pretrained
from diffusionblocks.checkpoint import COMPOSITION_FILE
from diffusionblocks.cli import main
from diffusionblocks.compose import parse_block_sources
from diffusionblocks.config import ConfigError
from diffusionblocks.data import DATASETS, DataConfig, invert, load_image_data, thicken
from diffusionblocks.reference import union
from diffusionblocks.tasks import read_config


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs of the same model: seed 0 on the digits, seed 1 on the thick digits."""
    root = tmp_path_factory.mktemp("compose")
    a, b = root / "a", root / "b"
    assert main(["train", "--out", str(a), "--no-progress", *TINY]) == 0
    assert main(["train", "--out", str(b), "--no-progress", *TINY, "train.seed=1", "data.dataset=digits-thick"]) == 0
    return a, b


def sample(run, path):
    assert main(["sample", str(run), "--num", "20", "--seed", "3", "--out", str(path), "--no-progress"]) == 0
    return np.load(path)["images"]


def test_composing_a_runs_own_blocks_reproduces_its_samples_exactly(runs, tmp_path, capsys):
    a, _ = runs
    c = tmp_path / "c"
    assert main(["compose", "--block", "0=" + str(a), "--block", "1,2=" + str(a), "--out", str(c)]) == 0
    for b in range(3):
        assert checkpoint.block_weights_path(c, b).read_bytes() == checkpoint.block_weights_path(a, b).read_bytes()
    assert np.array_equal(sample(c, tmp_path / "c.npz"), sample(a, tmp_path / "a.npz"))
    capsys.readouterr()
    code, out, _ = run_cli(capsys, "status", str(c))
    assert code == 0 and "3/3 trained" in out and f"block 1 composed from {a.resolve()}" in out


def test_a_composed_run_chains_both_sources_and_records_them(runs, tmp_path, capsys):
    a, b = runs
    c = tmp_path / "c"
    assert main(["compose", "--block", f"0={a}", "--block", f"1,2={b}", "--out", str(c), "name=mix"]) == 0
    cfg = read_config(c)
    assert cfg.name == "mix" and cfg.data.dataset == "digits"  # block 0's source's config, with the override
    rows = json.loads((c / COMPOSITION_FILE).read_text())["blocks"]
    assert [(r["block"], r["run"], r["data"]["dataset"]) for r in rows] == [
        (0, str(a.resolve()), "digits"), (1, str(b.resolve()), "digits-thick"), (2, str(b.resolve()), "digits-thick")]
    assert checkpoint.block_weights_path(c, 2).read_bytes() == checkpoint.block_weights_path(b, 2).read_bytes()
    mixed = sample(c, tmp_path / "c.npz")
    assert not np.array_equal(mixed, sample(a, tmp_path / "a.npz"))
    assert not np.array_equal(mixed, sample(b, tmp_path / "b.npz"))
    rows = [json.loads(line) for line in (c / "metrics.jsonl").read_text().splitlines()]
    source = {0: a, 1: b, 2: b}
    for blk in range(3):  # each block's training curve is its source's
        theirs = [json.loads(line) for line in (source[blk] / "metrics.jsonl").read_text().splitlines()]
        assert [r for r in rows if r["block"] == blk] == [r for r in theirs if r["block"] == blk]
    # What is trained is the blocks': --resume finds nothing to do and leaves them as they are.
    assert main(["train", "--resume", str(c), "--no-progress"]) == 0
    assert (c / "loss.png").is_file()
    assert checkpoint.block_weights_path(c, 0).read_bytes() == checkpoint.block_weights_path(a, 0).read_bytes()


def other_run(tmp_path, name, *overrides):
    run = tmp_path / name
    assert main(["train", "--out", str(run), "--no-progress", *TINY, "train.steps_per_block=1", *overrides]) == 0
    return run


@pytest.mark.parametrize("overrides,message", [
    (["noise.sigma_max=40"], "another noise axis: noise.sigma_max (40.0, not 80.0)"),
    (["blocks.gamma=0.1"], "another partition of the noise axis and of the layers: blocks.gamma"),
    (["blocks.num_blocks=1"], "blocks.num_blocks (3, not 1)"),
    (["model.num_classes=0"], "another model (its shape, channels and classes): model.num_classes (0, not 10)"),
])
def test_compose_refuses_blocks_that_cannot_chain(runs, tmp_path, capsys, overrides, message):
    a, _ = runs
    other = other_run(tmp_path, "other", *overrides)
    block = "0" if "num_blocks=1" in overrides[0] else "1,2"
    sources = [f"0={a}", f"1,2={other}"] if block == "1,2" else [f"0={other}", f"1,2={a}"]
    code, _, err = run_cli(capsys, "compose", "--block", sources[0], "--block", sources[1], "--out",
                           str(tmp_path / "c"))
    assert code == 2 and "cannot chain with block 0" in err and message in err, err
    assert not (tmp_path / "c").exists()


def test_compose_refuses_an_image_of_another_shape(runs, tmp_path, capsys):
    """Another image size is another model: refused before anything is written (28x28 MNIST-sized blocks here,
    built without data: the check reads the configs only)."""
    a, _ = runs
    other = tmp_path / "big"
    shutil.copytree(a, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model"]["image_size"] = 28
    (other / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "compose", "--block", f"0={a}", "--block", f"1,2={other}", "--out", str(tmp_path / "c"))
    assert code == 2 and "model.image_size (28, not 8)" in err


@pytest.mark.parametrize("blocks,message", [
    (["0={a}", "1={a}"], "block(s) [2] have no source: add --block 2=RUN"),
    (["0,1,2,3={a}"], "that run has blocks 0..2, no block 3"),
    (["1,2={a}"], "block 0 too: add --block 0=RUN"),
    (["0={a}", "0,1,2={a}"], "block 0 is already taken"),
    (["x={a}"], "is not of the form INDEX=RUN"),
    (["0={a}/nope", "1,2={a}"], "does not exist"),
])
def test_compose_refuses_a_bad_block_list(runs, tmp_path, capsys, blocks, message):
    a, _ = runs
    args = [x for spec in blocks for x in ("--block", spec.format(a=a))]
    code, _, err = run_cli(capsys, "compose", *args, "--out", str(tmp_path / "c"))
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and not (tmp_path / "c").exists()


def test_compose_refuses_untrained_blocks_bad_overrides_and_an_existing_out(runs, tmp_path, capsys):
    a, b = runs
    part = tmp_path / "part"
    assert main(["train", "--out", str(part), "--blocks", "0", "--no-progress", *TINY]) == 0
    code, _, err = run_cli(capsys, "compose", "--block", f"0,1={a}", "--block", f"2={part}", "--out", str(tmp_path / "c"))
    assert code == 2 and f"block 2 of {str(part)!r} has no weights" in err
    code, _, err = run_cli(capsys, "compose", "--block", f"0,1,2={a}", "--out", str(tmp_path / "c"), "model.depth=6")
    assert code == 2 and "may only set name, data., sample." in err
    code, _, err = run_cli(capsys, "compose", "--block", f"0,1,2={a}", "--out", str(b))
    assert code == 2 and "already exists" in err
    moved = tmp_path / "moved"  # a weights file renamed to another block's name
    shutil.copytree(a, moved)
    shutil.copy(checkpoint.block_weights_path(a, 0), checkpoint.block_weights_path(moved, 1))
    code, _, err = run_cli(capsys, "compose", "--block", f"0,1,2={moved}", "--out", str(tmp_path / "c"))
    assert code == 2 and "holds block 0's weights, not block 1's" in err
    assert not (tmp_path / "c").exists()


def test_parse_block_sources():
    assert parse_block_sources(["0=r", "2,1=s"]) == {0: __import__("pathlib").Path("r"), 2: __import__("pathlib").Path("s"),
                                                     1: __import__("pathlib").Path("s")}
    with pytest.raises(ConfigError, match="start at 0"):
        parse_block_sources(["-1=r"])


# ---- the second image domain


@pytest.mark.parametrize("dataset", ["digits-thick", "digits-inverted"])
def test_a_domain_is_the_same_images_transformed_with_the_same_labels(dataset):
    plain, other = load_image_data(DataConfig()), load_image_data(DataConfig(dataset=dataset))
    f = thicken if dataset.endswith("thick") else invert
    for p, o in ((plain.train, other.train), (plain.test, other.test)):
        assert torch.equal(o.labels, p.labels) and torch.equal(o.images, f(p.images))
        assert o.name == p.name.replace("digits", dataset)
    assert dataset in DATASETS


def test_thicken_is_a_dilation():
    x = torch.full((1, 1, 8, 8), -1.0)
    x[0, 0, 3, 3] = 1.0
    y = thicken(x)
    assert y[0, 0, 3, 3] == 1 and y[0, 0, 3, 4] == 1 and y.sum() == x.sum() + 2  # one pixel wider, to the right
    assert (y >= x).all() and (thicken(y) >= y).all()
    big = torch.full((1, 1, 28, 28), -1.0)
    big[0, 0, 10, 10] = 1.0
    assert (thicken(big) == 1).sum() == 9  # 3 x 3 on larger images
    assert torch.equal(invert(invert(x)), x)


def test_union_labels_by_class_or_by_domain():
    a, b = load_image_data(DataConfig()).test, load_image_data(DataConfig(dataset="digits-thick")).test
    by_class, by_domain = union([a, b]), union([a, b], by_domain=True)
    assert len(by_class) == len(a) + len(b) and by_class.num_classes == 10
    assert torch.equal(by_class.labels, torch.cat([a.labels, b.labels]))
    assert by_domain.num_classes == 2 and by_domain.labels.tolist() == [0] * len(a) + [1] * len(b)
    assert torch.equal(by_domain.images, by_class.images)


def test_fine_tuning_on_another_domain_with_from(runs, tmp_path):
    a, _ = runs
    new = tmp_path / "ft"
    assert main(["train", "--from", str(a), "--blocks", "2", "--out", str(new), "--no-progress",
                 "data.dataset=digits-thick", "train.steps_per_block=2"]) == 0
    assert read_config(new).data.dataset == "digits-thick"
    for b in (0, 1):
        assert checkpoint.block_weights_path(new, b).read_bytes() == checkpoint.block_weights_path(a, b).read_bytes()
    assert checkpoint.block_step(new, 2) == 2


def test_chain_diagnostics_take_each_blocks_own_domain(runs):
    from diffusionblocks.diagnostics import chain_diagnostics
    from diffusionblocks.reference import ReferenceClassifier

    a, _ = runs
    model, _ = pretrained.from_pretrained(a)
    plain, thick = load_image_data(DataConfig()).test, load_image_data(DataConfig(dataset="digits-thick")).test
    clf = ReferenceClassifier(1, 10).eval()
    kw = dict(num=8, steps=6)
    same = chain_diagnostics(model, plain, clf, **kw)
    assert chain_diagnostics(model, [plain] * 3, clf, **kw) == same
    mixed = chain_diagnostics(model, [plain, plain, thick], clf, **kw)
    rows, ref = mixed["per_step"], same["per_step"]
    # The chain is the same; only the last block's oracle inputs (thick digits) differ.
    assert [r for r in rows if r["block"] < 2] == [r for r in ref if r["block"] < 2]
    assert all(r["oracle_weighted_mse"] != s["oracle_weighted_mse"] for r, s in zip(rows, ref) if r["block"] == 2)
    with pytest.raises(ValueError, match="same labels"):
        chain_diagnostics(model, [plain, plain, load_image_data(DataConfig()).train], clf, **kw)
