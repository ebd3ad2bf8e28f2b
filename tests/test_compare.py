import json

import pytest
from conftest import TINY

from diffusionblocks.cli import compared_blocks, main
from diffusionblocks.config import even_split
from diffusionblocks.rundir import code_version


def test_even_split():
    assert even_split(6, 3) is None
    assert even_split(6, 4) == (2, 2, 1, 1)
    assert even_split(3, 2) == (2, 1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("refclf-cache")


def test_compare_writes_every_file_of_the_report(tmp_path, cache, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--out", str(out), "--num", "20", "--num-blocks", "2,3", "--cache-dir", str(cache),
                 "--no-progress", *TINY, "sample.steps=4"])
    assert code == 0, capsys.readouterr().err
    for name in ["report.md", "report.json", "metrics_vs_B.png", "loss_curves.png", "samples_side_by_side.png",
                 "chain_gap.png", "config.json"]:
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["runs"], key=int) == ["1", "2", "3"]
    for B, r in report["runs"].items():
        assert r["num_samples"] == 20 and 0 <= r["conditional_accuracy"] <= 1
        assert r["fd"] >= 0 and r["fd_real_floor"] >= 0
        assert [b["steps"] for b in r["train_summary"]["blocks"]] == [6] * int(B)  # equal compute
        assert len(r["chain"]["per_step"]) == 4
        assert sum(b["steps"] for b in r["chain"]["per_block"]) == 4
    # B=2 of 3 layers is an explicit 2/1 split, written into the run's config.
    assert json.loads((out / "B2" / "config.json").read_text())["blocks"]["layers_per_block"] == [2, 1]
    md = (out / "report.md").read_text()
    assert "| 3 | 1/1/1 |" in md and "Real-vs-real floor" in md
    # The code each run was trained with and the comparison evaluated with (this checkout's commit).
    here = code_version()
    assert report["code"] == {"evaluated": here, "trained": {"1": here, "2": here, "3": here}}
    assert f"B=3 `{here}`" in md and f"evaluated with `{here}`" in md
    # An existing report directory is not overwritten; --resume trains nothing new and rewrites the report.
    assert main(["compare", "--out", str(out), *TINY]) == 2
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("B*/block_*.safetensors")}
    # Without --num-blocks, --resume compares the B's the comparison has (never the default 2,3,4: no B=4).
    assert main(["compare", "--out", str(out), "--resume", "--num", "20", "--cache-dir", str(cache),
                 "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("B*/block_*.safetensors")} == mtimes
    assert not (out / "B4").exists() and compared_blocks(str(out), True) == "2,3"
    assert compared_blocks(str(out), False) == "2,3,4" and compared_blocks(str(tmp_path / "none"), True) == "2,3,4"


def test_evaluate_command(tmp_path, cache, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", *TINY]) == 0
    code = main(["evaluate", str(run), "--num", "20", "--steps", "5", "--cache-dir", str(cache), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "conditional accuracy" in out and "(20 samples)" in out and "floor" in out
    (ev,) = run.glob("eval-*")
    r = json.loads((ev / "evaluation.json").read_text())
    assert r["code"] == code_version() and json.loads((run / "train_summary.json").read_text())["code"] == r["code"]
    assert r["reference_classifier"]["heldout_accuracy"] >= 0.95
    assert {"chain_diagnostics.json", "chain_diagnostics.png", "samples.png"} <= {p.name for p in ev.iterdir()}
    blocks = r["chain"]["per_block"]
    assert [b["block"] for b in blocks] == [0, 1, 2]
    assert all(0 <= b["oracle_accuracy"] <= 1 and b["input_shift_fd"] >= 0 for b in blocks)
    # Who decides: each block's share of the classifier's error removed from chance, and of the information to reveal.
    d, steps = r["chain"]["decision"], r["chain"]["per_step"]
    assert [row["block"] for row in d["chain"]] == [0, 1, 2] and "who decides" in out
    assert sum(row["removed"] for row in d["chain"]) == pytest.approx(0.9 - (1 - steps[-1]["chain_accuracy"]))
    assert sum(row["share"] for row in d["information"]) == pytest.approx(1)
    assert all(row["share"] >= 0 for row in d["information"])  # a squared error integrates to no negative share
    assert main(["evaluate", str(run), "--num", "20", "--steps", "5", "--cache-dir", str(cache)]) == 2
