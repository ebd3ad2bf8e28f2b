import json

import numpy as np
import pytest
from conftest import TINY

from diffusionblocks.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The main job, end to end, at a tiny size."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "--out", str(run), "--no-progress", *TINY]) == 0
    return run


def test_main_job_end_to_end(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "metrics.jsonl", "loss.png", "samples.png", "train_summary.json"} <= names
    assert {f"block_{b:02d}.safetensors" for b in range(3)} <= names
    assert {f"block_{b:02d}.state.pt" for b in range(3)} <= names
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert {r["block"] for r in rows} == {0, 1, 2} and all(np.isfinite(r["loss"]) for r in rows)
    summary = json.loads((trained / "train_summary.json").read_text())
    assert [b["steps"] for b in summary["blocks"]] == [6, 6, 6]
    from PIL import Image

    grid = Image.open(trained / "samples.png")
    # One row per class (10), samples_per_class=2 columns of 8x8 images, 1 px padding, enlarged x4.
    assert grid.size == ((2 * 9 + 1) * 4, (10 * 9 + 1) * 4)


def test_sample_npz_covers_classes_evenly(trained, tmp_path, capsys):
    out = tmp_path / "s.npz"
    code, err = run_cli(capsys, "sample", str(trained), "--num", "20", "--steps", "4", "--out", str(out),
                        "--no-progress")
    assert code == 0, err
    f = np.load(out)
    assert f["images"].shape == (20, 1, 8, 8) and f["images"].dtype == np.float32
    assert f["images"].min() >= -1 and f["images"].max() <= 1
    assert f["labels"].dtype == np.int64 and np.bincount(f["labels"]).tolist() == [2] * 10


def test_sample_one_class_png_and_heun(trained, tmp_path, capsys):
    out = tmp_path / "s.png"
    code, err = run_cli(capsys, "sample", str(trained), "--num", "6", "--class", "3", "--steps", "3",
                        "--sampler", "heun", "--guidance", "1.5", "--out", str(out), "--no-progress")
    assert code == 0, err and out.stat().st_size > 0
    out2 = tmp_path / "s.npz"
    run_cli(capsys, "sample", str(trained), "--num", "4", "--class", "3", "--steps", "3", "--out", str(out2))
    assert (np.load(out2)["labels"] == 3).all()


def test_sample_is_reproducible_and_batch_independent(trained, tmp_path, capsys):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    run_cli(capsys, "sample", str(trained), "--num", "10", "--steps", "3", "--seed", "5", "--out", str(a))
    run_cli(capsys, "sample", str(trained), "--num", "10", "--steps", "3", "--seed", "5", "--out", str(b))
    assert np.array_equal(np.load(a)["images"], np.load(b)["images"])


@pytest.mark.parametrize("args,message", [
    (["train", "blocks.num_blocks=9"], "blocks.num_blocks=9 is larger than the number of layers"),
    (["train", "model.depht=3"], "unknown field 'model.depht'"),
    (["train", "blocks.layers_per_block=[1,1,1]"], "adds up to 3 layers but model.depth=6"),
    (["train", "data.dataset=mnist", "data.root=/nonexistent/mnist"], "/nonexistent/mnist"),
    (["train", "--config", "/nonexistent.json"], "does not exist"),
    (["train", "model.image_size=16"], "8x8 images but the model expects"),
    (["train", "--device", "cuda:7"], "cuda"),
    (["sample", "/nonexistent-run", "--out", "x.png"], "does not exist"),
    (["train", "train.lr=Infinity"], "train.lr must be a finite number"),
    (["train", "noise.sigma_max=Infinity"], "noise.sigma_max must be a finite number"),
    (["train", "--resume", "/nonexistent-run", "--out", "elsewhere"], "--out elsewhere would be ignored"),
])
def test_bad_input_stops_early_with_one_clear_message(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, *args)
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()  # nothing was created


def test_existing_run_directory_is_never_overwritten(trained, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in trained.iterdir()}
    code, err = run_cli(capsys, "train", "--out", str(trained), *TINY)
    assert code == 2 and "already exists" in err and "--resume" in err
    assert {p.name: p.stat().st_mtime_ns for p in trained.iterdir()} == before


def test_sample_refuses_to_overwrite(trained, tmp_path, capsys):
    out = tmp_path / "keep.png"
    out.write_bytes(b"mine")
    code, err = run_cli(capsys, "sample", str(trained), "--num", "2", "--out", str(out))
    assert code == 2 and "already exists" in err and out.read_bytes() == b"mine"


def test_sample_rejects_bad_class_and_corrupt_checkpoint(trained, tmp_path, capsys):
    code, err = run_cli(capsys, "sample", str(trained), "--class", "10", "--out", str(tmp_path / "a.png"))
    assert code == 2 and "--class 10 is out of range" in err
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    (broken / "block_01.safetensors").write_bytes(b"\x00" * 64)
    code, err = run_cli(capsys, "sample", str(broken), "--out", str(tmp_path / "b.png"))
    assert code == 2 and "block_01.safetensors" in err and "corrupt" in err


def test_resume_finishes_a_run_and_refuses_to_change_it(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(trained, run)
    code, err = run_cli(capsys, "train", "--resume", str(run), "model.depth=6")
    assert code == 2 and "would change what the run" in err
    code, err = run_cli(capsys, "train", "--resume", str(run), "train.steps_per_block=8", "--no-progress")
    assert code == 0, err
    assert json.loads((run / "train_summary.json").read_text())["blocks"][0]["steps"] == 8


@pytest.mark.parametrize("args,message", [
    (["--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
    (["--guidance", "-1"], "--guidance must be a finite number >= 0, got -1.0"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_sampling_arguments_follow_the_configs_rules(trained, tmp_path, capsys, args, message):
    code, err = run_cli(capsys, "sample", str(trained), "--num", "2", "--out", str(tmp_path / "x.png"), *args)
    assert code == 2 and message in err and not (tmp_path / "x.png").exists()
    code, err = run_cli(capsys, "evaluate", str(trained), "--num", "4", "--out", str(tmp_path / "ev"), *args)
    assert code == 2 and message in err and not (tmp_path / "ev").exists()


def test_resume_accepts_an_override_that_restates_the_runs_value(trained, capsys):
    code, err = run_cli(capsys, "train", "--resume", str(trained), "--schedule", "sequential", "--no-progress")
    assert code == 0, err
