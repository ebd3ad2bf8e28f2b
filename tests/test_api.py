"""The run's life from Python (diffusionblocks.runs): a new run, resume, --from, --blocks and the cleanup after a
failure, through the functions alone, make the files the command makes; typed options and the one table of what
may change."""

import dataclasses
import errno
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusionblocks import checkpoint, rundir
from diffusionblocks import tasks as tasks_registry
from diffusionblocks import train as train_module
from diffusionblocks.changes import COMPOSE, FROM, RESUME, changeable, identity, may_change
from diffusionblocks.cli import _parse, build_parser, main
from diffusionblocks.config import ConfigError
from diffusionblocks.options import SampleOptions
from diffusionblocks.runs import evaluate_run, run_status, sample_run, train_run
from diffusionblocks.tasks import (ComparingTask, EvaluatingTask, SamplingTask, apply_overrides, default_config,
                                   get_task, read_config, register)
from diffusionblocks.tasks.autoregressive import ARSampleOptions
from diffusionblocks.tasks.image_generation import ImageSampleOptions

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Two blocks of one layer, 4 steps each (checkpoints at 2 and 4), as tests/test_run_directories.py trains them.
SMALL = ["model.hidden_size=16", "model.num_heads=2", "model.depth=2", "blocks.num_blocks=2", "train.batch_size=8",
         "train.steps_per_block=4", "train.log_every=1", "train.checkpoint_every=2", "train.lr_warmup_steps=1",
         "train.ema_halflife_steps=0", "sample.steps=2", "sample.samples_per_class=1"]
RUN_FILES = {"config.json", "block_00.safetensors", "block_01.safetensors", "block_00.state.pt", "block_01.state.pt",
             "metrics.jsonl", "loss.png", "train_summary.json", "samples.png"}


def tensors(run: Path, b: int) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint.block_weights_path(run, b)))


def same_weights(a: Path, b: Path, block: int) -> bool:
    x, y = tensors(a, block), tensors(b, block)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def metric_steps(run: Path, b: int) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if row["block"] == b]


@pytest.fixture(scope="module")
def made(tmp_path_factory, one_thread):
    """One run made by the command, and the same run made by train_run."""
    root = tmp_path_factory.mktemp("made")
    assert main(["train", "--out", str(root / "cli"), "--no-progress", *SMALL]) == 0
    run = train_run(out=root / "api", overrides=SMALL, progress=False)
    return root / "cli", run


def test_a_new_run_from_python_is_the_commands_run(made):
    cli, api = made
    assert api == cli.parent / "api"
    assert {p.name for p in api.iterdir()} == {p.name for p in cli.iterdir()} == RUN_FILES
    assert (api / "config.json").read_text() == (cli / "config.json").read_text()
    assert all(same_weights(api, cli, b) for b in range(2))
    assert metric_steps(api, 0) == metric_steps(cli, 0) == [1, 2, 3, 4]
    summary = json.loads((api / "train_summary.json").read_text())
    assert [b["steps"] for b in summary["blocks"]] == [4, 4] and summary["trained_now"] == [0, 1]


def test_a_new_run_without_out_is_numbered_under_runs_root(tmp_path, one_thread):
    cfg = apply_overrides(default_config(), [*SMALL, "name=tiny", "train.steps_per_block=2"])
    run = train_run(cfg, runs_root=tmp_path, progress=False)
    assert run == tmp_path / "00000-tiny-B2" and checkpoint.block_step(run, 1) == 2


def test_resume_from_python_continues_in_place_and_refuses_another_model(made, tmp_path, one_thread):
    _, api = made
    run = tmp_path / "resumed"
    train_run(out=run, overrides=[*SMALL, "train.steps_per_block=2"], progress=False)
    assert train_run(resume=run, overrides=["train.steps_per_block=4"], progress=False) == run
    assert all(same_weights(run, api, b) for b in range(2))  # resumed at step 2: the run trained straight to 4
    assert metric_steps(run, 1) == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="override 'model.depth=4' would change what the run .* is; only "
                                          "train.steps_per_block, train.log_every, train.checkpoint_every, "
                                          "train.blocks_to_train, sample."):
        train_run(resume=run, overrides=["model.depth=4"])
    with pytest.raises(ConfigError, match="uses the run's own config.json; do not pass --config too"):
        train_run(default_config(), resume=run)
    with pytest.raises(ConfigError, match="pass one of them"):
        train_run(resume=run, from_=run)


def test_fine_tuning_one_block_from_python_copies_the_other(made, tmp_path, one_thread):
    _, api = made
    tuned = train_run(from_=api, blocks=[1], out=tmp_path / "tuned", overrides=["train.lr=1e-4"], progress=False)
    assert checkpoint.block_weights_path(tuned, 0).read_bytes() == checkpoint.block_weights_path(api, 0).read_bytes()
    assert not same_weights(tuned, api, 1) and checkpoint.block_step(tuned, 1) == 4
    rows = {row["block"]: row for row in checkpoint.read_composition(tuned)}
    assert rows[0]["role"] == "kept" and rows[1]["role"] == "start" and rows[1]["run"] == str(api.resolve())
    assert read_config(tuned).train.lr == 1e-4
    assert "block 0 kept from" in run_status(tuned) and "2/2 trained" in run_status(tuned)
    with pytest.raises(ConfigError, match="--reinit needs --from RUN"):
        train_run(out=tmp_path / "x", reinit=True)
    with pytest.raises(ConfigError, match="would change what the run"):
        train_run(from_=api, blocks=[1], out=tmp_path / "y", overrides=["model.depth=4"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_jobs_of_one_run_each_train_their_blocks_from_python(made, tmp_path, one_thread):
    _, api = made
    cfg = read_config(api)
    shared = tmp_path / "shared"
    train_run(cfg, shared, blocks=[1], progress=False)
    assert checkpoint.block_step(shared, 0) is None and "missing block(s) [0]" in run_status(shared)
    train_run(cfg, shared, blocks="0", progress=False)
    assert all(same_weights(shared, api, b) for b in range(2))
    with pytest.raises(ConfigError, match=r"block\(s\) \[0\] .* already have checkpoints"):
        train_run(cfg, shared, blocks=[0])
    with pytest.raises(ConfigError, match="the model has blocks 0..1"):
        train_run(cfg, tmp_path / "z", blocks=[2])


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, monkeypatch, one_thread):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(train_module, "train_step", full_disk)
    run = tmp_path / "r"
    with pytest.raises(OSError):
        train_run(out=run, overrides=SMALL, progress=False)
    assert not run.exists()
    numbered = tmp_path / "numbered"
    with pytest.raises(OSError):
        train_run(runs_root=numbered, overrides=SMALL, progress=False)
    assert list(numbered.iterdir()) == []
    existing = tmp_path / "mine"  # a directory the user made is kept, holding a run that never trained
    existing.mkdir()
    with pytest.raises(OSError):
        train_run(out=existing, overrides=SMALL, progress=False)
    assert [p.name for p in existing.iterdir()] == ["config.json"]
    monkeypatch.undo()
    assert checkpoint.block_step(train_run(out=existing, overrides=SMALL, progress=False), 1) == 4


def test_a_run_that_fails_after_a_checkpoint_is_kept_for_resume(tmp_path, monkeypatch, one_thread):
    real, calls = train_module.train_step, []

    def full_disk_later(task, state, *args, **kwargs):
        calls.append(state.step)
        if len(calls) == 3:  # block 0 checkpointed at step 2
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(task, state, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", full_disk_later)
    run, seen = tmp_path / "r", []
    with pytest.raises(OSError):
        train_run(out=run, overrides=SMALL, progress=False, on_run_dir=seen.append)
    assert seen == [run] and checkpoint.block_step(run, 0) == 2 and not list(run.glob("*.lock"))
    monkeypatch.setattr(train_module, "train_step", real)
    train_run(resume=run, progress=False)
    assert checkpoint.block_step(run, 1) == 4


def test_sample_from_python_writes_what_the_command_writes(made, tmp_path, capsys):
    cli, api = made
    assert main(["sample", str(cli), "--num", "6", "--steps", "3", "--class", "2",
                 "--out", str(tmp_path / "c.npz")]) == 0
    assert sample_run(api, out=str(tmp_path / "a.npz"), num=6, steps=3, class_=2) == tmp_path / "a.npz"
    a, c = np.load(tmp_path / "a.npz"), np.load(tmp_path / "c.npz")
    assert np.array_equal(a["images"], c["images"]) and (a["labels"] == 2).all()
    options = ImageSampleOptions(out=str(tmp_path / "b.npz"), num=6, steps=3, class_=2)
    sample_run(api, options)
    assert np.array_equal(np.load(tmp_path / "b.npz")["images"], a["images"])
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        sample_run(api, options)
    sample_run(api, options, overwrite=True, seed=1)  # keywords replace fields of the options given
    assert not np.array_equal(np.load(tmp_path / "b.npz")["images"], a["images"])
    for values, message in [({"out": str(tmp_path / "d.png"), "clas": 2}, "'clas' is not one of the sample options"),
                            ({"out": str(tmp_path / "d.png"), "steps": "3"}, "--steps must be an integer"),
                            ({"out": str(tmp_path / "d.png"), "sampler": "rk4"}, "--sampler 'rk4' is not one of"),
                            ({"out": str(tmp_path / "d.png"), "steps": 0}, "--steps must be at least 1"),
                            ({"out": str(tmp_path / "d.txt")}, "must end in .png or .npz"),
                            ({}, "--out must be given")]:
        with pytest.raises(ConfigError, match=message):
            sample_run(api, **values)
    with pytest.raises(ConfigError, match="are diffusionblocks.tasks.image_generation.ImageSampleOptions, not "
                                          "ARSampleOptions"):
        sample_run(api, ARSampleOptions(out=str(tmp_path / "e.png")))
    assert not (tmp_path / "d.png").exists()


@pytest.fixture
def mixture(monkeypatch):
    """examples/gaussian_mixture.py's task, registered as "mixture"."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from gaussian_mixture import MixtureTask

    register("mixture", MixtureTask)
    yield
    sys.modules.pop("gaussian_mixture", None)
    tasks_registry._REGISTRY.pop("mixture", None)  # the next registration imports the module afresh


def test_evaluate_from_python_writes_the_commands_directory(mixture, tmp_path, capsys, one_thread):
    cfg = apply_overrides(default_config("mixture"), ["model.hidden_size=32", "model.depth=2", "blocks.num_blocks=2",
                                                      "data.num_train=500", "data.num_test=200",
                                                      "train.steps_per_block=20", "train.batch_size=64",
                                                      "train.log_every=10", "train.checkpoint_every=10",
                                                      "sample.steps=5", "sample.num=50"])
    run = train_run(cfg, tmp_path / "m", progress=False)
    evaluated = evaluate_run(run, num=100, steps=5, progress=False)
    assert evaluated.out == run / "eval-n100-seed0"
    assert json.loads((evaluated.out / "evaluation.json").read_text()) == evaluated.result
    assert (evaluated.out / "samples.png").is_file() and "modes covered" in evaluated.summary
    assert evaluated.result["num_samples"] == 100
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        evaluate_run(run, num=100, steps=5)
    again = evaluate_run(run, get_task("mixture").evaluate_options(num=100, steps=5, overwrite=True))
    assert again.result == evaluated.result  # the same seed: the same samples
    assert sample_run(run, out=str(tmp_path / "p.npz"), num=16, steps=5).is_file()
    assert np.load(tmp_path / "p.npz")["points"].shape == (16, 2)


def test_an_evaluation_records_the_code_it_started_with(mixture, tmp_path, monkeypatch, one_thread):
    """A long evaluation names the commit it ran, not one checked out before it finished."""
    cfg = apply_overrides(default_config("mixture"), ["model.hidden_size=16", "model.depth=2", "blocks.num_blocks=2",
                                                      "data.num_train=200", "data.num_test=100",
                                                      "train.steps_per_block=4", "train.batch_size=32",
                                                      "train.log_every=2", "train.checkpoint_every=2"])
    run = train_run(cfg, tmp_path / "m", progress=False)
    version = {"now": "abc1234"}
    monkeypatch.setattr(rundir, "code_version", lambda *also: version["now"])
    task_class = type(get_task("mixture"))
    evaluate = task_class.evaluate

    def evaluate_during_a_checkout(self, run_dir, options):
        version["now"] = "def5678"
        return evaluate(self, run_dir, options)

    monkeypatch.setattr(task_class, "evaluate", evaluate_during_a_checkout)
    assert evaluate_run(run, num=20, steps=3, progress=False).result["code"] == "abc1234"


def test_tasks_declare_what_they_do_after_training():
    generate, classify, arlm = get_task("generate"), get_task("classify"), get_task("arlm")
    assert isinstance(generate, SamplingTask) and isinstance(generate, ComparingTask)
    assert not isinstance(classify, SamplingTask) and isinstance(classify, ComparingTask)
    assert isinstance(arlm, EvaluatingTask) and issubclass(arlm.sample_options, SampleOptions)
    for name in ("generate", "classify", "mdlm", "arlm", "recurrent"):
        task = get_task(name)
        for kind in ("sample_options", "evaluate_options"):
            cls = getattr(task, kind, None)
            assert cls is None or dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, (name, kind)


def test_the_command_makes_its_flags_from_the_options():
    args = _parse(build_parser(get_task("arlm")), ["sample", "RUN", "--out", "x.txt", "--no-cache", "--top-p", "0.9",
                                                   "--bridge", "argmax", "--greedy"])
    assert (args.cache, args.top_p, args.bridge, args.greedy, args.num) == (False, 0.9, "argmax", True, 100)
    args = _parse(build_parser(get_task("arlm")), ["sample", "RUN", "--out", "x.txt"])
    assert not hasattr(args, "cache") and args.top_p is None  # a switch not given keeps the option's default
    args = _parse(build_parser(get_task("generate")), ["evaluate", "RUN", "--no-diagnostics", "--no-progress"])
    assert (args.diagnostics, args.progress, args.num, args.cache_dir) == (False, False, 1000, None)


def test_one_table_says_what_may_change():
    generate, classify = default_config("generate"), default_config("classify")
    assert changeable(FROM, generate) == ("name", "train.", "data.", "sample.")
    assert changeable(COMPOSE, generate) == ("name", "data.", "sample.")
    assert changeable(RESUME, classify) == ("train.steps_per_block", "train.log_every", "train.checkpoint_every",
                                            "train.blocks_to_train", "sample.")
    assert may_change("train.lr", FROM, generate) and not may_change("train.lr", RESUME, generate)
    assert not may_change("model.depth", FROM, generate) and not may_change("name", RESUME, generate)
    d = classify.to_dict()
    kept = identity(classify)
    assert set(kept) == set(d) - {"name", "train", "sample", "data"}
    assert "sample" not in kept and kept["classify"] == d["classify"] and kept["model"] == d["model"]


def test_a_config_class_names_the_fields_resume_may_change():
    @dataclasses.dataclass(frozen=True)
    class Tuned(type(default_config("classify"))):
        resumable_fields = ("classify.loss_weighting",)

    cfg = Tuned()
    assert "classify.loss_weighting" in changeable(RESUME, cfg) and may_change("classify.loss_weighting", RESUME, cfg)
    assert not may_change("classify.loss_weighting", FROM, cfg) and not may_change("classify.loss_weighting", RESUME,
                                                                                  default_config("classify"))
    assert "loss_weighting" not in identity(cfg)["classify"] and "label_embedding" in identity(cfg)["classify"]
