"""A balanced partition in a run: the pilot, its measured curve, the boundaries it records, and resume, compose and
status reading them back without a refit."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

import diffusionblocks.runs as runs
from diffusionblocks import pilot
from diffusionblocks.cli import main
from diffusionblocks.config import ConfigError
from diffusionblocks.noise import LogNormalSigma, Partition, RemainingCurve, balanced_boundaries
from diffusionblocks.pretrained import from_pretrained
from diffusionblocks.seeding import make_generator
from diffusionblocks.tasks import apply_overrides, default_config, get_task, read_config

ARLM = ["--config", "presets/shakespeare-arlm.json", "model.hidden_size=32", "model.num_heads=2", "model.depth=3",
        "model.seq_len=32", "train.batch_size=16", "train.steps_per_block=8", "train.checkpoint_every=4",
        "train.lr_warmup_steps=2", "sample.num=1", "sample.new_chars=8", "sample.prompt_chars=8",
        "blocks.partition=balanced", "blocks.pilot_steps=12", "blocks.pilot_levels=8", "blocks.pilot_examples=32"]


@pytest.fixture(scope="module")
def balanced_arlm(tmp_path_factory, one_thread):
    run = tmp_path_factory.mktemp("balanced") / "arlm"
    assert main(["train", "--out", str(run), "--no-progress", *ARLM]) == 0
    return run


def test_a_balanced_run_records_the_boundaries_its_pilot_fitted(balanced_arlm, capsys):
    run = balanced_arlm
    cfg = read_config(run)
    record = json.loads((run / pilot.PARTITION_FILE).read_text())
    assert list(cfg.blocks.boundaries) == record["boundaries"]["balanced"]
    assert (run / "pilot" / "train_summary.json").is_file() and (run / "partition.png").is_file()
    assert read_config(run / "pilot").blocks.num_blocks == 1 and read_config(run / "pilot").model.depth == 3
    assert record["pilot"] == {**record["pilot"], "steps": 12, "layers": 3, "block_steps": 36}
    assert record["shares"]["balanced"] == pytest.approx([1 / 3] * 3, abs=1e-9)
    assert record["undecided_at_lowest"] == pytest.approx(record["measured"][0] / record["measured"][-1])
    assert sum(record["shares"]["equiprobable"]) == pytest.approx(1)
    # The fitted curve is the isotonic fit of the measured one: non-decreasing toward more noise.
    assert all(a <= b + 1e-12 for a, b in zip(record["fitted"], record["fitted"][1:]))
    assert [list(k) for k in cfg.blocks.curve] == [list(k) for k in zip(record["levels"], record["fitted"])]
    # Each block was built for the recorded partition: its advertised range is the balanced training range.
    model, _ = from_pretrained(run)
    partition = get_task("arlm").partition(cfg)
    assert partition.boundaries[1:-1].tolist() == list(cfg.blocks.boundaries)
    for b, block in enumerate(model.blocks):
        assert (block.sigma_min, block.sigma_max) == pytest.approx(partition.training_range(b))
    assert main(["status", str(run)]) == 0
    assert "fitted by a pilot of 12 end-to-end steps" in capsys.readouterr().out


def test_the_pilot_measures_the_cross_entropy_at_one_noise_level(balanced_arlm):
    """undecided at level s: the pilot's cross-entropy on E[x] + s eps, every position at s."""
    task = get_task("arlm")
    model, cfg = from_pretrained(balanced_arlm / "pilot")
    block = model.blocks[0]
    batch = task.batch_sampler(cfg, task.load_run_data(cfg, balanced_arlm / "pilot").test, 0).batch(0)
    inputs = task.loss_inputs(cfg, pilot.FixedLevel(0.7), 0, batch, make_generator(0, "t"))
    assert (inputs["sigma"] == 0.7).all()
    with torch.no_grad():
        u = task.undecided(cfg, block, inputs, 0.7)
        _, logits = block.denoise(block.E[batch] + 0.7 * inputs["noise"], inputs["sigma"], batch)
    ce = F.cross_entropy(logits.transpose(1, 2), batch, reduction="none").mean(1)
    assert u.float() == pytest.approx(ce, rel=1e-5)


def test_resume_trains_the_blocks_with_the_recorded_boundaries_and_never_refits(tmp_path, monkeypatch, capsys,
                                                                                 one_thread):
    run = tmp_path / "arlm"
    real_train = runs.train

    def stop_before_the_blocks(task, cfg, *args, **kwargs):
        if cfg.blocks.num_blocks > 1:
            raise KeyboardInterrupt
        return real_train(task, cfg, *args, **kwargs)

    monkeypatch.setattr(runs, "train", stop_before_the_blocks)
    assert main(["train", "--out", str(run), "--no-progress", *ARLM]) != 0
    assert f"--resume {run}" in capsys.readouterr().err
    fitted = read_config(run).blocks.boundaries
    assert fitted is not None and not any(run.glob("block_*.safetensors"))
    pilot_time = (run / "pilot" / "train_summary.json").stat().st_mtime_ns
    monkeypatch.setattr(runs, "train", real_train)
    monkeypatch.setattr(pilot, "measure_undecided", lambda *a, **k: pytest.fail("refitted on resume"))
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert read_config(run).blocks.boundaries == fitted
    assert (run / "pilot" / "train_summary.json").stat().st_mtime_ns == pilot_time
    assert all((run / f"block_0{b}.safetensors").is_file() for b in range(3))


def test_compose_keeps_the_recorded_boundaries_and_refuses_other_ones(balanced_arlm, tmp_path, capsys, one_thread):
    fitted = read_config(balanced_arlm).blocks.boundaries
    same = tmp_path / "same"
    assert main(["compose", "--block", f"0,1={balanced_arlm}", "--block", f"2={balanced_arlm}", "--out",
                 str(same)]) == 0
    assert read_config(same).blocks.boundaries == fitted
    other = tmp_path / "other"
    moved = f"blocks.boundaries=[{fitted[0] * 0.9},{fitted[1]}]"
    assert main(["train", "--out", str(other), "--no-progress", *ARLM, "train.steps_per_block=1", moved]) == 0
    assert not (other / "pilot").exists()  # boundaries given: no pilot
    capsys.readouterr()
    code = main(["compose", "--block", f"0={balanced_arlm}", "--block", f"1,2={other}", "--out", str(tmp_path / "c")])
    assert code == 2 and "blocks.boundaries" in capsys.readouterr().err


def test_a_balanced_image_run_fits_the_information_to_reveal(tmp_path, one_thread, monkeypatch):
    """... and with blocks.density=fitted its blocks draw their training levels from the recorded curve."""
    drawn = []
    sample = Partition.sample
    monkeypatch.setattr(Partition, "sample", lambda self, *a, **k: drawn.append(self.curve) or sample(self, *a, **k))
    run = tmp_path / "dit"
    assert main(["train", "--out", str(run), "--no-progress", *TINY, "blocks.partition=balanced",
                 "blocks.density=fitted", "blocks.pilot_steps=6", "blocks.pilot_levels=6",
                 "blocks.pilot_examples=16"]) == 0
    record = json.loads((run / pilot.PARTITION_FILE).read_text())
    assert record["measure"] == "mmse" and record["remaining"][0] == 0
    cfg = read_config(run)
    assert list(cfg.blocks.boundaries) == record["boundaries"]["balanced"]
    assert cfg.blocks.density == "fitted" and read_config(run / "pilot").blocks.density == "train"
    # The pilot drew from the training density, the blocks from the fitted curve.
    assert drawn[0] is None and drawn[-1] == cfg.blocks.curve and get_task("generate").partition(cfg).curve == \
        cfg.blocks.curve


def test_information_to_reveal_of_a_denoiser_that_removes_no_noise_is_linear_in_log_sigma():
    """mmse = c sigma^2 (the denoiser returns its input): I grows as c ln sigma, so the balanced partition is the
    uniform one in ln sigma; a data scale that caps mmse moves the boundaries down."""
    axis = LogNormalSigma()
    levels = torch.logspace(math.log10(axis.lo), math.log10(axis.hi), 33, dtype=torch.float64)
    I = pilot.information_to_reveal(levels, 0.3 * levels ** 2)
    assert I == pytest.approx(0.3 * (levels.log() - math.log(axis.lo)), rel=1e-9, abs=1e-12)
    fitted = balanced_boundaries(axis, RemainingCurve.fit(axis, levels, I), 3)
    assert fitted == pytest.approx(Partition(axis, 3, "uniform").boundaries[1:-1].tolist(), rel=1e-9)
    capped = pilot.information_to_reveal(levels, levels ** 2 * 0.25 / (levels ** 2 + 0.25))  # data variance 0.25
    lower = balanced_boundaries(axis, RemainingCurve.fit(axis, levels, capped), 3)
    assert all(a < b for a, b in zip(lower, fitted))


@pytest.mark.parametrize("overrides,message", [
    (["blocks.boundaries=[0.1,1.0]"], "blocks.partition is 'equiprobable'"),
    (["blocks.partition=balanced", "blocks.boundaries=[0.1]"], "must be blocks.num_blocks - 1 = 2"),
    (["blocks.partition=balanced", "blocks.boundaries=[1.0,0.1]"], "ascending"),
    (["blocks.partition=balanced", "blocks.pilot_levels=2"], "blocks.pilot_levels must be at least 4"),
])
def test_bad_balanced_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(default_config("arlm"), overrides)


def test_a_task_without_a_pilot_measure_and_block_wise_jobs_are_refused_before_training(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "r"), *TINY, "noise.parameterization=flow",
                 "blocks.partition=balanced"])
    assert code == 2 and "not available for this generate run" in capsys.readouterr().err
    code = main(["train", "--out", str(tmp_path / "d"), "--blocks", "1", *TINY, "blocks.partition=balanced"])
    assert code == 2 and "block-wise jobs" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "d").exists()
    with pytest.raises(ConfigError, match="no fitted boundaries yet"):
        get_task("generate").partition(apply_overrides(default_config(), ["blocks.partition=balanced"]))


def test_a_run_stopped_in_its_pilot_says_so_and_resumes_it(tmp_path, monkeypatch, capsys, one_thread):
    run = tmp_path / "arlm"
    real_train = runs.train

    def stop_in_the_pilot(task, cfg, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "train", stop_in_the_pilot)
    assert main(["train", "--out", str(run), "--no-progress", *ARLM]) != 0
    assert read_config(run).blocks.boundaries is None and (run / "pilot" / "config.json").is_file()
    capsys.readouterr()
    assert main(["status", str(run)]) == 0
    assert "pilot has not finished" in capsys.readouterr().out
    monkeypatch.setattr(runs, "train", real_train)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert read_config(run).blocks.boundaries is not None and (run / pilot.PARTITION_FILE).is_file()
