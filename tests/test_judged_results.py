"""The independent judge in the masked-diffusion and recurrent-depth results: `evaluate` scores the samples under
it (generative perplexity), measures MAUVE with its ceiling and floor, and skips all of it with `--judge none`; the
masked-diffusion compare report states the judge and refuses one that is a compared run."""

import copy
import json
from pathlib import Path

import pytest
import torch
from test_judge import TINY_JUDGE

from diffusionblocks import judge as J
from diffusionblocks.cli import main
from diffusionblocks.config import ConfigError
from diffusionblocks.tasks import get_task, read_config

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
MDLM = ["task=mdlm", f"data.path={SHAKESPEARE}", "model.seq_len=32", "model.hidden_size=16", "model.num_heads=2",
        "model.depth=3", "train.batch_size=4", "train.steps_per_block=2", "train.log_every=1",
        "train.lr_warmup_steps=1", "sample.num=0", "sample.steps=4"]
RECURRENT = ["--task", "recurrent", f"data.path={SHAKESPEARE}", "model.hidden_size=16", "model.num_heads=2",
             "model.seq_len=12", "model.mean_recurrence=2", "model.bptt=1", "train.batch_size=4",
             "train.steps_per_block=2", "train.log_every=1", "train.lr_warmup_steps=1", "sample.num=0",
             "sample.prompt_chars=4"]
MDLM_EVAL = ["--windows", "8", "--repeats", "1", "--strata", "2", "--num", "2", "--no-progress"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_judge(monkeypatch):
    """`--judge auto` builds (once per module's cache) and finds the tiny judge of test_judge."""
    monkeypatch.setattr(J, "JUDGE_PRESET", copy.deepcopy(TINY_JUDGE))


@pytest.fixture(scope="module")
def mdlm_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    for B in (1, 3):
        assert main(["train", "--out", str(out / f"B{B}"), "--no-progress", *MDLM, f"blocks.num_blocks={B}"]) == 0
    return out


def _evaluation(run: Path, out: Path, *args: str) -> dict:
    assert main(["evaluate", str(run), "--out", str(out), *args]) == 0
    r = json.loads((out / "evaluation.json").read_text())
    r["train_summary"] = json.loads((run / "train_summary.json").read_text())
    return r


def test_masked_diffusion_is_judged_and_its_report_states_the_judge(mdlm_runs, cache, tiny_judge, tmp_path):
    results = {B: _evaluation(mdlm_runs / f"B{B}", tmp_path / f"ev{B}", *MDLM_EVAL, "--cache-dir", str(cache),
                              "--mauve-prompts", "20", "--mauve-prompt-chars", "8")
               for B in (1, 3)}
    for r in results.values():
        judge = r["judge"]
        assert Path(judge["run"]).parent == cache / "judges"
        assert judge["steps"] == TINY_JUDGE["train"]["steps_per_block"]
        assert r["gen_ppl"] == pytest.approx(2 ** r["gen_bits"]) and r["gen_ppl"] > 1
        m = r["mauve"]  # windows of 32 completed after 8 held-out characters, against their held-out rest
        assert m["num_p"] == m["num_q"] == 20 and m["prompt_len"] == 8 and m["new"] == 24 and 0 < m["mauve"] <= 1 + 1e-9
        assert m["clusters"] == 2 and 0 < m["distinct_4"] <= 1 and m["gen_ppl"] > 1
        b = judge["bounds"]
        assert b["num"] == 20 and b["prompt_len"] == 8 and b["new"] == 24 and {"ceiling", "floor"} <= set(b)
        assert 0 < r["distinct_2"] <= 1 and r["longest_run_max"] >= 0
    assert results[1]["judge"]["run"] == results[3]["judge"]["run"]  # built once, then found in the cache
    configs = {B: read_config(mdlm_runs / f"B{B}") for B in results}
    task = get_task("mdlm")
    task.write_comparison(mdlm_runs, configs, results, {})
    report = (mdlm_runs / "report.md").read_text()
    assert f"Judge: `{results[1]['judge']['run']}`" in report and "## MAUVE" in report
    assert "| B=3 |" in report and "ceiling: other held-out text" in report and "floor: unigram draws" in report
    weaker = [B for B, r in results.items() if not results[1]["judge"]["held_out_bpc"] < r["bpc"]]
    assert ("is NOT below every judged model's" in report) == bool(weaker)
    # A judge that is one of the compared runs is refused.
    itself = {B: {**r, "judge": {**r["judge"], "run": str(mdlm_runs / "B1")}} for B, r in results.items()}
    with pytest.raises(ConfigError, match="is one of the compared runs"):
        task.write_comparison(mdlm_runs, configs, itself, {})


def test_masked_diffusion_without_a_judge_and_bad_judge_options(mdlm_runs, tmp_path, capsys, monkeypatch):
    def no_judge(*args, **kwargs):
        raise AssertionError("a judge was looked for")

    monkeypatch.setattr(J, "load_or_train_judge", no_judge)
    r = _evaluation(mdlm_runs / "B1", tmp_path / "ev", *MDLM_EVAL, "--judge", "none")
    assert not {"judge", "gen_ppl", "mauve"} & set(r) and "distinct_4" in r
    configs = {B: read_config(mdlm_runs / f"B{B}") for B in (1, 3)}
    get_task("mdlm").write_comparison(mdlm_runs, configs, {1: r, 3: r}, {})
    assert "**No judge**" in (mdlm_runs / "report.md").read_text()
    capsys.readouterr()
    for args, message in ((["--mauve-prompt-chars", "32"], "--mauve-prompt-chars must be at least 1 and below "
                                                            "model.seq_len=32, got 32"),
                          (["--mauve-prompts", "-1"], "--mauve-prompts must be at least 0, got -1"),
                          (["--mauve-prompts", "0", "--judge", str(mdlm_runs / "B3")], "a judge is a plain run")):
        assert main(["evaluate", str(mdlm_runs / "B1"), *MDLM_EVAL, *args, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_recurrent_depth_is_judged_by_the_independent_judge(cache, tiny_judge, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", *RECURRENT, "model.mode=diffusion"]) == 0
    common = ["--iterations", "1,2", "--prompts", "2", "--new", "3", "--windows", "4", "--chain-draws", "2",
              "--top-k", "2", "--no-progress"]
    r = _evaluation(run, tmp_path / "ev", *common, "--cache-dir", str(cache), "--mauve-prompts", "20",
                    "--mauve-new", "8", "--mauve-iterations", "2,4")
    assert Path(r["judge"]["run"]).parent == cache / "judges" and r["judge"]["held_out_bpc"] > 0
    assert r["mauve_iterations"] == [2] and r["judge"]["bounds"]["floor"]["num_p"] == 20
    one, two = r["by_iterations"]
    assert one["gen_ppl"] > 1 and two["gen_ppl"] > 1 and "mauve" not in one
    assert two["mauve"]["num_p"] == two["mauve"]["num_q"] == 20 and two["mauve"]["new"] == 8
    r = _evaluation(run, tmp_path / "ev-none", *common, "--judge", "none")
    assert "judge" not in r and r["mauve_iterations"] == []
    assert all("gen_ppl" not in row and "mauve" not in row for row in r["by_iterations"])


def test_masked_diffusion_completes_the_held_out_prompts_it_is_measured_against(mdlm_runs, cache, tiny_judge,
                                                                                tmp_path, monkeypatch):
    from diffusionblocks.tasks import masked_diffusion as M

    seen = []

    def recording(judge, generated, reference, prompt_len, **kwargs):
        seen.append((generated, reference, prompt_len))
        return J.text_quality(judge, generated, reference, prompt_len, **kwargs)

    monkeypatch.setattr(M, "text_quality", recording)
    _evaluation(mdlm_runs / "B3", tmp_path / "ev", *MDLM_EVAL, "--cache-dir", str(cache), "--mauve-prompts", "12",
                "--mauve-prompt-chars", "5")
    ((generated, reference, P),) = seen
    assert P == 5 and generated.shape == reference.shape == (12, 32)
    assert torch.equal(generated[:, :5], reference[:, :5])  # one held-out prompt per sample, kept
    assert not torch.equal(generated[:, 5:], reference[:, 5:])  # the rest is the model's
    test = get_task("mdlm").load_run_data(read_config(mdlm_runs / "B3"), mdlm_runs / "B3").test
    assert torch.equal(reference, J.held_out_continuations(test, 12, 5, 27)[0])
