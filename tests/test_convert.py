"""convert: an end-to-end run into B blocks (depth and copy), its refusals, fine-tuning, resuming and composing a
converted run, distillation from the source, and train.blocks_to_train."""

import json
import re

import numpy as np
import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from diffusionblocks import checkpoint
from diffusionblocks.checkpoint import COMPOSITION_FILE
from diffusionblocks.cli import main
from diffusionblocks.config import ConfigError
from diffusionblocks.convert import convert_run
from diffusionblocks.models.layers import take_layers
from diffusionblocks.runs import train_run
from diffusionblocks.tasks import apply_overrides, default_config, get_task, read_config

L = 4
E2E = [*TINY, f"model.depth={L}", "blocks.num_blocks=1"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny end-to-end DiT (B=1) of 4 layers."""
    run = tmp_path_factory.mktemp("convert") / "e2e"
    assert main(["train", "--out", str(run), "--no-progress", *E2E]) == 0
    return run


def weights(run, b):
    return load_file(str(checkpoint.block_weights_path(run, b)))


def same_tensors(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def sample(run, path):
    assert main(["sample", str(run), "--num", "20", "--seed", "3", "--out", str(path), "--no-progress"]) == 0
    return np.load(path)["images"]


def test_take_layers_renumbers_a_range_and_copies_the_rest():
    w = {"net.layers.0.w": torch.zeros(1), "net.layers.3.w": torch.ones(1), "net.layers.12.w": torch.ones(2),
         "x_embedder.weight": torch.ones(3), "players.1": torch.ones(1)}
    got = take_layers(w, 3, 13)
    assert sorted(got) == ["net.layers.0.w", "net.layers.9.w", "players.1", "x_embedder.weight"]
    assert torch.equal(got["net.layers.9.w"], w["net.layers.12.w"])
    assert got["x_embedder.weight"].data_ptr() != w["x_embedder.weight"].data_ptr()  # a copy: nothing shared


def test_a_copy_conversion_samples_exactly_what_its_source_samples(source, tmp_path, capsys):
    out = tmp_path / "copy"
    assert main(["convert", str(source), "--num-blocks", "2", "--init", "copy", "--out", str(out)]) == 0
    cfg = read_config(out)
    assert cfg.blocks.num_blocks == 2 and cfg.layer_split() == (L, L) and cfg.model.depth == 2 * L
    assert cfg.train.teacher == str(source.resolve())
    for b in range(2):
        assert same_tensors(weights(out, b), weights(source, 0))
    assert np.array_equal(sample(out, tmp_path / "c.npz"), sample(source, tmp_path / "s.npz"))
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "2/2 trained" in shown
    assert f"block 1 converted (copy: layers 0-3 of block 0) from {source.resolve()}" in shown


def test_depth_blocks_hold_exactly_the_source_layer_tensors(source, tmp_path):
    out = tmp_path / "depth"
    cfg = convert_run(source, 2, "depth", out)
    assert cfg.layer_split() == (2, 2) and cfg.model.depth == L and cfg.name.endswith("-depth-B2")
    theirs = weights(source, 0)
    used = set()
    for b in range(2):
        ours = weights(out, b)
        per_layer = sum(".layers.0." in k for k in theirs)
        assert len(ours) == len(theirs) - 2 * per_layer  # the other block's two layers are not here
        for key, w in ours.items():
            if ".layers." in key:
                head, _, rest = key.partition(".layers.")
                i, _, tail = rest.partition(".")
                key = f"{head}.layers.{2 * b + int(i)}.{tail}"
                used.add(key)
            assert torch.equal(w, theirs[key]), key
    assert used == {k for k in theirs if ".layers." in k}  # every layer in exactly one block
    rows = json.loads((out / COMPOSITION_FILE).read_text())["blocks"]
    assert [(r["role"], r["layers"], r["source_sha256"]) for r in rows] == [
        ("converted", [0, 2], checkpoint.sha256_file(checkpoint.block_weights_path(source, 0))),
        ("converted", [2, 4], checkpoint.sha256_file(checkpoint.block_weights_path(source, 0)))]
    sample(out, tmp_path / "d.npz")  # a chain like any


def test_the_conversions_that_cannot_be_made_are_refused_before_anything_is_written(source, tmp_path):
    out = tmp_path / "x"
    cases = [
        (dict(num_blocks=3, init="depth"), "do not split evenly"),
        (dict(num_blocks=5, init="depth"), "more than the 4 layers"),
        (dict(num_blocks=1, init="copy"), "at least 2"),
        (dict(num_blocks=2, init="width"), "--init 'width'"),
        (dict(num_blocks=2, init="depth", overrides=["model.hidden_size=64"]), "model.hidden_size=64"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            convert_run(source, out=out, **kwargs)
        assert not out.exists()
    convert_run(source, 2, "depth", tmp_path / "d")
    with pytest.raises(ConfigError, match="B=2 blocks: convert takes an end-to-end run"):
        convert_run(tmp_path / "d", 2, "copy", out)
    (out / "mine.txt").parent.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="already exists"):
        convert_run(source, 2, "copy", out)
    assert (out / "mine.txt").read_text() == "keep"


def test_a_run_of_a_task_or_mode_without_conversion_is_refused(tmp_path, capsys):
    plain = tmp_path / "plain"
    assert main(["train", "--task", "classify", "--out", str(plain), "--no-progress", "model.mode=plain",
                 "blocks.num_blocks=1", "model.hidden_size=32", "model.num_heads=2", "model.depth=2",
                 "train.steps_per_block=2", "train.batch_size=8", "train.lr_warmup_steps=1"]) == 0
    capsys.readouterr()
    assert main(["convert", str(plain), "--num-blocks", "2", "--out", str(tmp_path / "x")]) == 2
    assert "model.mode='plain' run is a plain ViT classifier" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="cannot convert its runs into blocks"):
        get_task("recurrent").split_weights(default_config("recurrent"), {}, 0, 1)


def test_a_converted_run_fine_tunes_resumes_and_composes(source, tmp_path):
    conv = convert_run(source, 2, "depth", tmp_path / "conv") and tmp_path / "conv"
    before = [checkpoint.block_weights_path(conv, b).read_bytes() for b in range(2)]
    assert main(["train", "--resume", str(conv), "--no-progress"]) == 0  # its blocks are results: nothing to train
    assert [checkpoint.block_weights_path(conv, b).read_bytes() for b in range(2)] == before
    ft = {}
    for b in range(2):  # each block fine-tuned by its own job, chosen in the config
        ft[b] = train_run(from_=conv, out=tmp_path / f"ft{b}", progress=False,
                          overrides=[f"train.blocks_to_train=[{b}]", "train.steps_per_block=4"])
        assert checkpoint.block_weights_path(ft[b], b).read_bytes() != before[b]
        assert checkpoint.block_weights_path(ft[b], 1 - b).read_bytes() == before[1 - b]
    # A fine-tuning stopped before its first checkpoint starts again from the converted weights.
    again = train_run(from_=conv, out=tmp_path / "again", blocks=[1], progress=False,
                      overrides=["train.steps_per_block=4"])
    for suffix in (".safetensors", ".state.pt"):
        checkpoint.block_weights_path(again, 1).with_suffix(suffix).unlink(missing_ok=True)
    checkpoint.block_state_path(again, 1).unlink(missing_ok=True)
    assert main(["train", "--resume", str(again), "--no-progress"]) == 0
    assert same_tensors(weights(again, 1), weights(ft[1], 1))
    mix = tmp_path / "mix"
    assert main(["compose", "--block", f"0={ft[0]}", "--block", f"1={ft[1]}", "--out", str(mix)]) == 0
    for b in range(2):
        assert checkpoint.block_weights_path(mix, b).read_bytes() == \
            checkpoint.block_weights_path(ft[b], b).read_bytes()
    sample(mix, tmp_path / "mix.npz")


def test_blocks_to_train_splits_a_run_over_jobs_sharing_its_directory(tmp_path):
    whole = train_run(apply_overrides(default_config(), TINY), tmp_path / "whole", progress=False)
    shared = tmp_path / "shared"
    for chosen in ("[2]", "[0,1]"):
        train_run(apply_overrides(default_config(), [*TINY, f"train.blocks_to_train={chosen}"]), shared,
                  progress=False)
    assert read_config(shared).train.blocks_to_train is None  # a job's choice, not the run's
    for b in range(3):
        assert same_tensors(weights(whole, b), weights(shared, b))
    train_run(resume=shared, overrides=["train.blocks_to_train=[1]"], progress=False)  # may change on resume
    with pytest.raises(ConfigError, match=r"train.blocks_to_train=\[3\] must name distinct blocks among 0..2"):
        apply_overrides(default_config(), [*TINY, "train.blocks_to_train=[3]"])


def test_distillation_from_the_source_is_checked_and_learns_its_output(source, tmp_path):
    with pytest.raises(ConfigError, match="needs train.teacher"):
        apply_overrides(default_config(), ["train.distill_weight=1"])
    conv = tmp_path / "conv"
    convert_run(source, 2, "copy", conv)
    # A copy's blocks are their teacher: the distance to it starts at 0, so the first step's loss is the plain one.
    runs = {w: train_run(from_=conv, out=tmp_path / f"w{w}", blocks=[1], progress=False,
                         overrides=[f"train.distill_weight={w}", "train.steps_per_block=1", "train.log_every=1"])
            for w in (0, 1)}
    loss = {w: json.loads((r / "metrics.jsonl").read_text().splitlines()[-1])["loss"] for w, r in runs.items()}
    assert loss[1] == pytest.approx(loss[0], rel=1e-5)
    depth = convert_run(source, 2, "depth", tmp_path / "depth")
    assert depth.train.teacher == str(source.resolve())
    d = {w: train_run(from_=tmp_path / "depth", out=tmp_path / f"d{w}", blocks=[0], progress=False,
                      overrides=[f"train.distill_weight={w}", "train.steps_per_block=1", "train.log_every=1"])
         for w in (0, 1)}
    assert not same_tensors(weights(d[0], 0), weights(d[1], 0))
    # A teacher that is not an end-to-end run of the same model is refused before any training.
    wider = tmp_path / "wider"
    assert main(["train", "--out", str(wider), "--no-progress", *E2E, "model.hidden_size=16",
                 "train.steps_per_block=1"]) == 0
    for teacher, message in [(tmp_path / "depth", "B=2 blocks; a teacher is an end-to-end run"),
                             (tmp_path / "nothing", "train.teacher=.*does not exist"),
                             (wider, r"another model.hidden_size \(16, not 32\)")]:
        with pytest.raises(ConfigError, match=message):
            train_run(from_=tmp_path / "depth", out=tmp_path / "t", blocks=[0], progress=False,
                      overrides=["train.distill_weight=1", f"train.teacher={teacher}"])
        assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("task, overrides", [
    ("generate", []), ("classify", ["model.mode=diffusion"]), ("arlm", ["model.mode=diffusion"]), ("mdlm", [])])
def test_each_denoising_task_splits_its_end_to_end_block_into_its_blocks(task, overrides):
    small = ["model.hidden_size=32", "model.num_heads=2", "model.depth=4", *overrides]
    e2e = apply_overrides(default_config(task), [*small, "blocks.num_blocks=1", "blocks.layers_per_block=null"])
    cfg = apply_overrides(e2e, ["blocks.num_blocks=2"])
    t = get_task(task)
    whole = t.build_block(e2e, 0, torch.Generator().manual_seed(0)).state_dict()
    for b in range(2):
        block = t.build_block(cfg, b)
        block.load_state_dict(t.split_weights(e2e, whole, 2 * b, 2 * b + 2))  # strict: every tensor, right shapes
        kept = [k for k in block.state_dict() if not re.search(r"(^|\.)layers\.", k)]
        assert kept and all(torch.equal(block.state_dict()[k], whole[k]) for k in kept)
