"""Regression: short runs of the digits presets reproduce what was recorded (`digests.py`, `regression_digests.json`).

On an environment that has a recording (torch build, threads, instruction set, CPU) every case must reproduce it
bit for bit: weights, logged losses, sample grid, evaluation. On any other (another CPU, another torch) the same
runs are compared with the reference recording within tolerances measured between instruction sets; the report
header says which mode this session runs in.
"""

from __future__ import annotations

import json

import digests
import pytest
import torch

from diffusionblocks.cli import main
from diffusionblocks.tasks import config_from_dict, get_task, image_generation

_RUNS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    """The description of each case, trained once per session on demand."""
    def get(name: str) -> dict:
        if name not in _RUNS:
            _RUNS[name] = digests.describe_run(digests.train_case(name, tmp_path_factory.mktemp("regression")))
        return _RUNS[name]
    return get


def check_case(name: str, got: dict) -> str:
    """Compares case `name`'s description with the recording of this environment (bit for bit) or, where there is
    none, with the reference recording within the tolerances; returns the mode it ran in."""
    file = digests.load()
    ref = digests.reference(file)["cases"][name]
    failures = digests.tolerant_failures(got, ref, file["tolerance"]["limits"])
    mine = digests.recording_for(digests.environment(), file)
    if mine is None or name not in mine["cases"]:
        assert not failures, f"tolerant mode (no recording for {digests.environment()}): {failures}"
        return "tolerant"
    assert got["digests"] == digests.expected_digests(mine["cases"][name]), "exact mode: the digests differ"
    assert not failures, f"exact mode: the digests hold but the tolerant comparison fails: {failures}"
    return "exact"


@pytest.mark.parametrize("name", list(digests.CASES))
def test_runs_reproduce_the_recording(name, described, record_property):
    record_property("regression_mode", check_case(name, described(name)))


def test_an_unrecorded_environment_is_compared_within_tolerances(described, monkeypatch):
    unrecorded = {**digests.environment(), "cpu_capability": "SOME_OTHER_ISA", "torch": "0.0.0"}
    monkeypatch.setattr(digests, "environment", lambda: unrecorded)
    assert digests.recording_for(unrecorded) is None
    assert check_case("dit-sequential", described("dit-sequential")) == "tolerant"
    assert check_case("vit-learned_joint", described("vit-learned_joint")) == "tolerant"


def _larger_lr(step):
    def larger(self, *args, **kwargs):  # the trainer sets every group's lr again before each step
        for group in self.param_groups:
            group["lr"] *= 1.01
        return step(self, *args, **kwargs)
    return larger


def _roll_noise(loss_inputs):
    def rolled(self, *args, **kwargs):
        inputs = loss_inputs(self, *args, **kwargs)
        return {**inputs, "noise": inputs["noise"].roll(1, dims=0)}  # each image gets its neighbour's noise
    return rolled


@pytest.mark.parametrize("change", ["lr+1%", "noise draw"])
def test_the_tolerant_mode_fails_on_a_deliberate_change(change, tmp_path, monkeypatch):
    """A learning rate 1% larger than the config's, or the same noise handed to other images of the batch (changes
    of the code, not of the config), is caught."""
    if change == "lr+1%":
        monkeypatch.setattr(torch.optim.AdamW, "step", _larger_lr(torch.optim.AdamW.step))
    else:
        task = image_generation.ImageGenerationTask
        monkeypatch.setattr(task, "loss_inputs", _roll_noise(task.loss_inputs))
    got = digests.describe_run(digests.train_case("dit-sequential", tmp_path))
    file = digests.load()
    failures = digests.tolerant_failures(got, digests.reference(file)["cases"]["dit-sequential"],
                                         file["tolerance"]["limits"])
    assert any(f.startswith(("loss", "weights")) for f in failures), failures


def _moved(node, kinds: dict, path: str = ""):
    """A copy of an evaluation whose values of each kind in `kinds` (kind -> function of the value) are moved."""
    if isinstance(node, dict):
        return {k: _moved(v, kinds, f"{path}/{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [_moved(v, kinds, f"{path}/{i}") for i, v in enumerate(node)]
    move = kinds.get(digests._kind(path.lstrip("/"), node))
    return node if move is None else move(node)


def _arlm_with_evaluation(**kinds) -> tuple[dict, dict, dict]:
    """(the reference's arlm case with its evaluation's values of each kind moved by kinds[kind], that case, the
    limits)."""
    file = digests.load()
    ref = digests.reference(file)["cases"]["arlm"]
    case = json.loads(json.dumps(ref))
    case["digests"]["evaluation"] = _moved(case["digests"]["evaluation"], kinds)
    return case, ref, file["tolerance"]["limits"]


def _failing(case: dict, ref: dict, limits: dict) -> list[str]:
    return [f.split(":")[0] for f in digests.tolerant_failures(case, ref, limits)]


def test_one_flipped_token_is_tolerated_and_a_moved_figure_is_not():
    """One of the arlm case's 248 scored tokens decided the other way moves its error rates by 1/248 and the decision
    shares made of them by a tenth (as an AMD EPYC did against the reference): within the tolerances. A figure that is
    a function of the weights (bits) moved by 0.1% is caught, and so are error rates moved by 20 tokens."""
    flipped, ref, limits = _arlm_with_evaluation(decided=lambda v: v + 1 / 248, derived=lambda v: v - 0.13)
    assert digests.deviations(flipped, ref)["decided"] == pytest.approx(1 / 248)
    assert _failing(flipped, ref, limits) == []
    assert _failing(*_arlm_with_evaluation(figures=lambda v: v * 1.001)) == ["figures"]
    assert _failing(*_arlm_with_evaluation(decided=lambda v: v + 20 / 248)) == ["decided"]
    assert _failing(*_arlm_with_evaluation(text_figures=lambda v: v + 1)) == ["text_figures"]


def test_a_nan_where_the_recording_has_a_number_is_caught():
    """max() passes over a NaN that is not first: a NaN figure, loss or weight statistic must fail all the same."""
    nan = float("nan")
    assert _failing(*_arlm_with_evaluation(figures=lambda v: nan)) == ["figures"]
    case, ref, limits = _arlm_with_evaluation()
    case["digests"]["losses"][-1][2] = nan.hex()
    for tensors in case["values"]["weights"].values():
        for stats in tensors.values():
            stats[-1] = nan
    assert _failing(case, ref, limits) == ["loss", "weights"]


def test_drift_reports_the_largest_deviation_of_every_quantity(tmp_path, capsys):
    """`digests.py drift`'s last line holds every quantity of every case, not only those of the last case."""
    ref = digests.reference()
    cases = {k: ref["cases"][k] for k in ("dit-sequential", "arlm")}
    moved = json.loads(json.dumps(cases))
    first_loss = moved["dit-sequential"]["digests"]["losses"][0]
    first_loss[2] = (float.fromhex(first_loss[2]) * 1.5).hex()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"environment": ref["environment"], "cases": moved}))
    b.write_text(json.dumps({"environment": ref["environment"], "cases": cases}))
    digests._main(["drift", str(a), str(b)])
    largest = capsys.readouterr().out.splitlines()[-1].split()
    assert largest[0] == "largest" and {"pixels", "text", "decided", "figures"} <= set(largest[1::2])
    assert float(largest[largest.index("loss") + 1]) == pytest.approx(0.5)  # the first case's, not the last one's


def test_recording_an_environment_keeps_the_others(tmp_path, monkeypatch):
    file = tmp_path / "digests.json"
    file.write_text(digests.DIGESTS.read_text())
    before = json.loads(file.read_text())["recordings"]
    monkeypatch.setattr(digests, "DIGESTS", file)
    new_env = {**digests.environment(), "cpu": "a CPU nobody has"}
    monkeypatch.setattr(digests, "describe_all", lambda out: {"environment": new_env, "cases": {}})
    digests.record(tmp_path)
    digests.record(tmp_path)  # the same environment again replaces its own recording only
    after = json.loads(file.read_text())["recordings"]
    assert after[:-1] == before and after[-1]["environment"] == new_env


def test_configs_written_before_the_refactor_load():
    """Every recorded config (fe85824's form, the classifier's older one) loads as its task's config."""

    for recording in digests.load()["recordings"]:
        for case in recording["cases"].values():
            for f in case["digests"]["files"].values():
                if f["config"] is None:  # label_embedding.safetensors
                    continue
                cfg = config_from_dict(f["config"])
                assert json.loads(cfg.to_json()) == digests.current_form(f["config"])
                assert config_from_dict(cfg.to_dict()) == cfg


def test_a_run_directory_of_the_old_form_samples_resumes_and_shows_status(tmp_path, tiny_cfg, capsys):
    from diffusionblocks.data import load_image_data
    from diffusionblocks.train import train

    run = tmp_path / "run"
    run.mkdir()
    old = {**tiny_cfg.to_dict(), "classify": {"mode": "diffusion", "label_embedding": "fixed",
                                              "loss_weighting": "per_sample", "inference_steps": 0}}
    (run / "config.json").write_text(json.dumps(old, indent=2))
    train(get_task(tiny_cfg.task), tiny_cfg, load_image_data(tiny_cfg.data).train, run, progress=False)
    assert main(["status", str(run)]) == 0 and "3/3 trained" in capsys.readouterr().out
    assert main(["sample", str(run), "--num", "4", "--steps", "3", "--out", str(tmp_path / "x.npz")]) == 0
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
