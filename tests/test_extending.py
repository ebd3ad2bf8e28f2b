"""A task from outside the package (examples/gaussian_mixture.py) trains, samples, evaluates and compares,
through the CLI (named in a config as "module:Class") and through Python (registered by name)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusionblocks.cli import main
from diffusionblocks.config import ConfigError
from diffusionblocks.pretrained import from_pretrained
from diffusionblocks.tasks import apply_overrides, default_config, get_task, load_config, read_config, register
from diffusionblocks.train import train

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["model.hidden_size=64", "model.depth=3", "data.num_train=2000", "data.num_test=500",
        "train.steps_per_block=300", "train.batch_size=128", "train.lr=1e-3", "train.lr_warmup_steps=10",
        "train.log_every=50", "train.checkpoint_every=100", "sample.steps=20", "sample.num=200"]


@pytest.fixture
def in_examples(monkeypatch):
    """Runs from examples/, as its docstring says: the module is found in the current directory."""
    monkeypatch.chdir(EXAMPLES)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(EXAMPLES))])
    yield
    sys.modules.pop("gaussian_mixture", None)


def test_cli_trains_samples_evaluates_and_compares(tmp_path, in_examples, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", "mixture.json", "--out", str(run), "--no-progress", *TINY]) == 0
    cfg = read_config(run)
    assert cfg.task == "gaussian_mixture:MixtureTask" and type(cfg).__name__ == "MixtureConfig"
    assert {"block_00.safetensors", "block_02.safetensors", "samples.png", "loss.png"} <= {p.name for p in run.iterdir()}
    assert main(["status", str(run)]) == 0
    assert "3/3 trained" in capsys.readouterr().out

    assert main(["sample", str(run), "--num", "64", "--steps", "10", "--out", str(tmp_path / "p.npz")]) == 0
    assert np.load(tmp_path / "p.npz")["points"].shape == (64, 2)
    with pytest.raises(SystemExit):  # not an option of this task: argparse's usage and exit status 2
        main(["sample", str(run), "--num", "8", "--class", "3", "--out", str(tmp_path / "q.npz")])
    assert main(["sample", "--steps", "5", str(run), "--num", "4", "--out", str(tmp_path / "r.npz")]) == 0

    assert main(["evaluate", str(run), "--num", "400", "--no-progress"]) == 0
    r = json.loads((run / "eval-n400-seed0" / "evaluation.json").read_text())
    # 300 steps per block already put a third of the samples within 3 std of a centre (measured 0.36, log-likelihood
    # -6.7 nats/point); an untrained chain 0.07 and -36.5.
    assert r["in_mode_fraction"] > 0.25 and r["log_likelihood"] > -15 and r["modes_covered"] == 8
    assert (run / "eval-n400-seed0" / "samples.png").is_file()

    out = tmp_path / "cmp"
    assert main(["compare", "--config", "mixture.json", "--out", str(out), "--num-blocks", "3", "--num", "200",
                 "--no-progress", *TINY, "train.steps_per_block=30"]) == 0
    md = (out / "report.md").read_text()
    assert "| 1 | 3 |" in md and "| 3 | 1/1/1 |" in md
    assert (out / "samples_B1.png").is_file() and (out / "samples_B3.png").is_file()
    assert json.loads((out / "report.json").read_text())["runs"]["3"]["num_samples"] == 200


def test_python_api_with_a_registered_name(tmp_path, in_examples):
    sys.path.insert(0, str(EXAMPLES))
    try:
        from gaussian_mixture import MixtureTask, sample_points
    finally:
        sys.path.remove(str(EXAMPLES))
    register("mixture", MixtureTask)
    cfg = apply_overrides(default_config("mixture"), TINY)
    assert cfg.task == "mixture"
    task = get_task("mixture")
    data = task.load_data(cfg)
    untrained = train(get_task(cfg.task), apply_overrides(cfg, ["train.steps_per_block=1"]), data.train, None, progress=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(cfg.to_json())
    states = train(get_task(cfg.task), cfg, data.train, run, progress=False)
    assert sorted(states) == [0, 1, 2] and all(s.step == 300 for s in states.values())
    model, loaded = from_pretrained(run)
    assert loaded == cfg
    x = sample_points(model, 300, 20, seed=0)
    assert x.shape == (300, 2)

    def in_mode(points):
        return float((torch.cdist(points, data.centres).min(1).values < 3 * data.std).double().mean())

    from diffusionblocks.blocks import BlockwiseDenoiser

    fresh = BlockwiseDenoiser([s.denoiser.eval() for s in untrained.values()], get_task(cfg.task).partition(cfg))
    assert in_mode(x) > 0.25 > 0.15 > in_mode(sample_points(fresh, 300, 20, seed=0))


def test_bad_task_names_stop_with_one_message(tmp_path):
    for task, message in [("no_such_module:Task", "cannot import module 'no_such_module'"),
                          ("json:JSONDecoder", "is not a diffusionblocks.tasks.Task subclass"),
                          ("nonsense", "is not a known task")]:
        path = tmp_path / "c.json"
        path.write_text(json.dumps({"task": task}))
        with pytest.raises(ConfigError, match=message):
            load_config(path)
    assert main(["train", "--task", "no_such_module:Task", "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()
