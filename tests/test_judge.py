"""The independent judge: its cache (built once, keyed by config and data, atomic), what it accepts, and what it
measures (generative bits, features, MAUVE with its ceiling and floor)."""

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from diffusionblocks import judge as J
from diffusionblocks import train as train_module
from diffusionblocks.chain_likelihood import next_token_bits
from diffusionblocks.cli import main
from diffusionblocks.config import ConfigError
from diffusionblocks.models.arlm import CausalLM
from diffusionblocks.pretrained import from_pretrained
from diffusionblocks.tasks import apply_overrides, default_config

ROOT = Path(__file__).resolve().parents[1]

# A judge of a few steps: the preset's fields, shrunk.
TINY_JUDGE = copy.deepcopy(J.JUDGE_PRESET)
TINY_JUDGE["model"].update(seq_len=16, hidden_size=16, depth=2, num_heads=2)
TINY_JUDGE["train"].update(steps_per_block=3, batch_size=4, lr_warmup_steps=1, log_every=1, checkpoint_every=3)
TINY_JUDGE["sample"].update(num=0)


def corpus(path: Path, seed: int = 0, chars: str = "abcdefgh \n") -> Path:
    """A generated text of 6000 characters: words of a few letters."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(chars), (6000,), generator=g)
    path.write_text("".join(chars[i] for i in ids.tolist()))
    return path


def run_config(text: Path, *extra: str):
    return apply_overrides(default_config("arlm"), [f"data.path={text}", "model.vocab_size=16", "model.seq_len=12",
                                                    "model.hidden_size=16", "model.num_heads=2", "model.depth=2",
                                                    "blocks.num_blocks=2", *extra])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    cfg = run_config(corpus(root / "a.txt"))
    judge, info = J.load_or_train_judge(cfg, cache_dir=root / "cache", judge_config=TINY_JUDGE)
    return root, cfg, judge, info


def test_the_preset_is_the_judge_config():
    preset = json.loads((ROOT / "presets" / "shakespeare-judge.json").read_text())
    preset.pop("data")
    assert preset == J.JUDGE_PRESET


def test_the_cache_is_built_once_then_loaded(built, monkeypatch):
    root, cfg, judge, info = built
    entry = Path(info["run"])
    assert not info["cached"] and entry.parent == root / "cache" / "judges" and (entry / "judge.json").is_file()
    assert entry.name.startswith("shakespeare-judge-") and len(entry.name.split("-")[-1]) == 16
    assert info["steps"] == 3 and info["held_out_bpc"] > 0 and isinstance(judge.lm, CausalLM)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no building directory left

    def no_training(*args, **kwargs):
        raise AssertionError("a cached judge was trained again")

    monkeypatch.setattr(J, "train", no_training)
    again, info2 = J.load_or_train_judge(cfg, cache_dir=root / "cache", judge_config=TINY_JUDGE)
    assert info2["cached"] and info2["run"] == info["run"] and info2["held_out_bpc"] == info["held_out_bpc"]
    for a, b in zip(judge.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_the_recorded_bits_are_next_token_bits_on_every_held_out_window(built):
    root, cfg, judge, info = built
    model, jcfg = from_pretrained(info["run"])
    data = J.get_task("arlm").load_run_data(jcfg, info["run"])
    windows = J.held_out_windows(data.test, jcfg.model.seq_len)
    assert info["held_out_windows"] == len(windows)
    assert info["held_out_bits_per_token"] == pytest.approx(next_token_bits(model, windows), rel=1e-5)


def test_the_key_changes_with_the_data_and_the_config(built, tmp_path):
    root, cfg, _, _ = built
    jcfg, data, fingerprint, key = J._judge_data(cfg, TINY_JUDGE)
    other_text = run_config(corpus(tmp_path / "b.txt", seed=1))
    assert J._judge_data(other_text, TINY_JUDGE)[3] != key
    longer = copy.deepcopy(TINY_JUDGE)
    longer["train"]["steps_per_block"] = 4
    assert J._judge_data(cfg, longer)[3] != key
    # What does not change the weights does not change the key: the run's name, where the file lies, the logging.
    moved = tmp_path / "moved.txt"
    shutil.copy(cfg.data.path, moved)
    logging = copy.deepcopy(TINY_JUDGE)
    logging["train"]["log_every"] = 7
    assert J._judge_data(run_config(moved, "name=x"), logging)[3] == key
    # The compared run's own sizes are not the judge's.
    assert J._judge_data(run_config(Path(cfg.data.path), "model.depth=4", "blocks.num_blocks=2"), TINY_JUDGE)[3] == key


def test_a_field_added_later_with_its_default_keeps_the_key(built):
    """A config class that gains a field (as the blocks section gained `density`) keeps every cached judge's key
    while the field is at its default; set to another value, it is a new judge."""
    import dataclasses
    _, cfg, _, _ = built
    jcfg, _, fingerprint, key = J._judge_data(cfg, TINY_JUDGE)
    assert J.judge_key(jcfg, fingerprint) == key

    @dataclasses.dataclass(frozen=True)
    class Later(type(jcfg)):
        added_later: int = 0

    later = Later(**{f.name: getattr(jcfg, f.name) for f in dataclasses.fields(jcfg)})
    assert J.judge_key(later, fingerprint) == key
    assert J.judge_key(dataclasses.replace(later, added_later=1), fingerprint) != key


def test_a_vocabulary_mismatch_is_refused(built, tmp_path):
    root, cfg, _, info = built
    other = tmp_path / "other"
    assert main(["train", "--out", str(other), "--no-progress", "--task", "arlm",
                 f"data.path={corpus(tmp_path / 'c.txt', chars='xyzw ')}", "model.vocab_size=16", "model.seq_len=12",
                 "model.hidden_size=16", "model.num_heads=2", "model.depth=2", "blocks.num_blocks=1",
                 "model.mode=plain", "train.steps_per_block=1", "train.batch_size=2", "sample.num=0"]) == 0
    with pytest.raises(ConfigError, match="its vocabulary is not the run's: id 0"):
        J.load_or_train_judge(cfg, cache_dir=root / "cache", judge_config=TINY_JUDGE, run_dir=other)
    with pytest.raises(ConfigError, match="its vocabulary is not the run's"):
        J.explicit_judge(info["run"], run_dir=other)
    with pytest.raises(ConfigError, match=r"is not the judge of this data: its config differs in .*model.seq_len \(12, the judge's: 16\)"):
        J.install_judge(other, cfg, tmp_path / "cache", judge_config=TINY_JUDGE)


def test_an_explicit_plain_run_is_taken_and_a_chain_refused(built, tmp_path):
    root, cfg, judge, info = built
    plain = tmp_path / "plain"  # a plain run without judge.json: its held-out bits are measured
    shutil.copytree(info["run"], plain)
    (plain / "judge.json").unlink()
    taken, meta = J.resolve_judge(info["run"], cfg, plain)
    assert meta["held_out_bpc"] == info["held_out_bpc"] and meta["run"] == info["run"]
    _, meta = J.explicit_judge(plain, run_dir=info["run"])
    assert meta["held_out_bits_per_token"] == pytest.approx(info["held_out_bits_per_token"], rel=1e-5)
    chain = tmp_path / "chain"
    assert main(["train", "--out", str(chain), "--no-progress", "--task", "arlm", f"data.path={cfg.data.path}",
                 "model.vocab_size=16", "model.seq_len=12", "model.hidden_size=16", "model.num_heads=2",
                 "model.depth=2", "blocks.num_blocks=2", "train.steps_per_block=1", "train.batch_size=2",
                 "sample.num=0"]) == 0
    with pytest.raises(ConfigError, match="a judge is a plain run"):
        J.resolve_judge(str(chain), cfg, plain)
    with pytest.raises(ConfigError, match="cannot judge itself"):
        J.resolve_judge(str(plain), cfg, plain)
    assert J.resolve_judge("none", cfg, plain) == (None, None)


def test_the_build_is_atomic(tmp_path, monkeypatch):
    cfg = run_config(corpus(tmp_path / "a.txt"))

    def broken(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(J, "train", broken)
    with pytest.raises(RuntimeError, match="killed"):
        J.load_or_train_judge(cfg, cache_dir=tmp_path / "cache", judge_config=TINY_JUDGE)
    assert list((tmp_path / "cache" / "judges").iterdir()) == []  # no entry, no partial build
    # A build interrupted after a checkpoint is resumed, and only the finished one appears.
    steps = []

    def half(task, jcfg, *args, **kwargs):
        steps.append(jcfg.train.steps_per_block)
        if len(steps) == 1:
            train_module.train(task, J.dataclasses.replace(jcfg, train=J.dataclasses.replace(
                jcfg.train, steps_per_block=2)), *args, **kwargs)
            raise RuntimeError("killed after a checkpoint")
        return train_module.train(task, jcfg, *args, **kwargs)

    monkeypatch.setattr(J, "train", half)
    longer = copy.deepcopy(TINY_JUDGE)
    longer["train"]["checkpoint_every"] = 1
    with pytest.raises(RuntimeError, match="after a checkpoint"):
        J.load_or_train_judge(cfg, cache_dir=tmp_path / "cache", judge_config=longer)
    (left,) = (tmp_path / "cache" / "judges").iterdir()
    assert left.name.endswith(".building") and J.checkpoint.block_step(left, 0) == 2
    _, info = J.load_or_train_judge(cfg, cache_dir=tmp_path / "cache", judge_config=longer)
    assert info["steps"] == 3 and [p.name for p in (tmp_path / "cache" / "judges").iterdir()] == [Path(info["run"]).name]
    first = [json.loads(line)["step"] for line in (Path(info["run"]) / "metrics.jsonl").read_text().splitlines()]
    assert first == [1, 2, 3]  # resumed at step 2, not restarted


def test_one_process_builds_a_judge_and_another_is_told(tmp_path):
    cfg = run_config(corpus(tmp_path / "a.txt"))
    jcfg, _, _, key = J._judge_data(cfg, TINY_JUDGE)
    building = J.judge_dir(jcfg, key, tmp_path / "cache").parent / f".{J.judge_dir(jcfg, key).name}.building"
    building.mkdir(parents=True)
    other = J.rundir.BlockClaims(building)
    other.claim(0)
    try:
        with pytest.raises(ConfigError, match="another process is building this judge"):
            J.load_or_train_judge(cfg, cache_dir=tmp_path / "cache", judge_config=TINY_JUDGE)
        assert building.is_dir()  # the other process' directory is left alone
    finally:
        other.release()
    _, info = J.load_or_train_judge(cfg, cache_dir=tmp_path / "cache", judge_config=TINY_JUDGE)
    assert sorted(p.name for p in Path(info["run"]).iterdir() if p.suffix == ".lock") == []


def test_a_run_trained_elsewhere_is_installed(built, tmp_path, monkeypatch):
    root, cfg, judge, info = built
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(info["run"], elsewhere)
    (elsewhere / "judge.json").unlink()
    entry = J.install_judge(elsewhere, cfg, tmp_path / "cache", judge_config=TINY_JUDGE)
    assert entry.name == Path(info["run"]).name and (entry / "judge.json").is_file()
    _, meta = J.load_or_train_judge(cfg, cache_dir=tmp_path / "cache", judge_config=TINY_JUDGE)
    assert meta["cached"] and meta["held_out_bpc"] == pytest.approx(info["held_out_bpc"])
    with pytest.raises(ConfigError, match="already has this judge"):
        J.install_judge(elsewhere, cfg, tmp_path / "cache", judge_config=TINY_JUDGE)
    monkeypatch.setattr(J, "JUDGE_PRESET", TINY_JUDGE)  # the command, with the run's own data section
    assert main(["install-judge", str(elsewhere), "--cache-dir", str(tmp_path / "cache-cli")]) == 0
    assert (tmp_path / "cache-cli" / "judges" / entry.name / "judge.json").is_file()
    same_letters = run_config(corpus(tmp_path / "b.txt", seed=1))  # another text of the same characters
    with pytest.raises(ConfigError, match="was trained on other text"):
        J.install_judge(elsewhere, same_letters, tmp_path / "cache3", judge_config=TINY_JUDGE)
    longer = copy.deepcopy(TINY_JUDGE)
    longer["train"]["steps_per_block"] = 5
    cfg_dict = json.loads((elsewhere / "config.json").read_text())
    cfg_dict["train"]["steps_per_block"] = 5
    (elsewhere / "config.json").write_text(json.dumps(cfg_dict))
    with pytest.raises(ConfigError, match="not trained to the end"):
        J.install_judge(elsewhere, cfg, tmp_path / "cache2", judge_config=longer)


class Uniform(torch.nn.Module):
    """A judge whose every next-token distribution is uniform over V tokens; its hidden state is the token's
    one-hot vector."""

    def __init__(self, V: int):
        super().__init__()
        self.V = V
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, self.V)

    def hidden(self, tokens):
        return torch.nn.functional.one_hot(tokens, self.V).float()


def test_generative_bits_by_hand():
    lm = CausalLM(5, hidden_size=8, depth=1, num_heads=2)
    lm.initialize_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        lm.head.weight.normal_(generator=torch.Generator().manual_seed(1))
    judge = J.Judge(lm, window=4).eval()
    ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1], [4, 4, 3, 2, 1, 0, 0]])
    # Position t is scored from the pass that starts at max(0, t - 2) with the tokens s..t-1 as context.
    expected, n = 0.0, 0
    for row in ids:
        for t in range(2, 7):
            s = 0 if t < 4 else (2 if t < 6 else 4)
            logp = torch.log_softmax(lm(row[None, s:t])[0, -1].detach(), -1)
            expected -= float(logp[row[t]]) / math.log(2)
            n += 1
    assert J.generative_bits(judge, ids, 2) == pytest.approx(expected / n, rel=1e-5)
    assert J.generative_bits(judge, ids, 2, batch_size=1) == pytest.approx(expected / n, rel=1e-5)
    assert J.generative_bits(J.Judge(Uniform(8), 12), torch.randint(8, (3, 40)), 5) == pytest.approx(3.0)


def test_features_are_the_mean_state_over_the_continuation():
    judge = J.Judge(Uniform(6), window=4)
    ids = torch.tensor([[0, 1, 2, 2, 5, 5, 5], [1, 1, 1, 1, 1, 1, 1]])
    f = J.features(judge, ids, 3)
    assert f.shape == (2, 6) and f.dtype == torch.float32
    assert torch.allclose(f[0], torch.tensor([0, 0, 0.25, 0, 0, 0.75])) and f[1, 1] == 1
    lm = CausalLM(5, hidden_size=8, depth=1, num_heads=2)
    lm.initialize_weights(torch.Generator().manual_seed(0))
    real = J.features(J.Judge(lm, 16), torch.randint(5, (7, 20)), 4)
    assert real.shape == (7, 8)
    ids = torch.randint(5, (3, 10))
    assert torch.allclose(J.features(J.Judge(lm, 16), ids, 4), lm.hidden(ids)[:, 4:].mean(1), atol=1e-6)


def test_mauve_of_equal_and_of_separated_feature_sets():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(300, 8, generator=g)
    same = J.mauve_score(p, p.clone(), seed=1)
    assert same["mauve"] > 0.99 and same["num_p"] == same["num_q"] == 300 and same["clusters"] == 30
    far = J.mauve_score(p, torch.randn(300, 8, generator=g) + 20, seed=1, num_buckets=10)
    assert far["mauve"] < 0.05 and far["clusters"] == 10
    q = torch.randn(300, 8, generator=g)
    q[:, 0] += 3.0  # half of q lies away from p
    half = torch.cat([p[:150], q[150:]])
    near = J.mauve_score(half, p, seed=1)["mauve"]
    # A deliberate mistake: half of the rows swapped for other features changes the result.
    assert near < same["mauve"] - 0.05 and near > far["mauve"]


def test_held_out_sets_and_the_floor(tmp_path):
    text = corpus(tmp_path / "a.txt")
    data = J.get_task("arlm").load_data(run_config(text))
    ref, other, overlap = J.held_out_continuations(data.test, 10, 4, 8)
    assert ref.shape == other.shape == (10, 12) and 0 <= overlap <= 1
    n = len(data.test.tokens)
    stride = (n - 12) // 10
    assert torch.equal(ref[3], data.test.tokens[3 * stride:3 * stride + 12])
    assert overlap == 0 if stride >= 24 else overlap > 0
    floor = J.unigram_continuations(data.train.tokens, ref[:, :4], 500, len(data.vocab),
                                    torch.Generator().manual_seed(0))
    assert torch.equal(floor[:, :4], ref[:, :4])
    freq = torch.bincount(data.train.tokens, minlength=len(data.vocab)).double()
    drawn = torch.bincount(floor[:, 4:].flatten(), minlength=len(data.vocab)).double()
    assert torch.allclose(drawn / drawn.sum(), freq / freq.sum(), atol=0.02)
    skewed = J.unigram_continuations(torch.tensor([0] * 900 + [2] * 100), ref[:, :4], 500, 3,
                                     torch.Generator().manual_seed(0))[:, 4:]
    assert abs(float((skewed == 0).double().mean()) - 0.9) < 0.02 and not (skewed == 1).any()
    with pytest.raises(ConfigError, match="too few"):
        J.held_out_continuations(data.test, 10_000, 4, 8)


def test_text_quality_and_bounds_with_the_tiny_judge(built):
    root, cfg, judge, info = built
    data = J.get_task("arlm").load_data(cfg)
    ref, other, _ = J.held_out_continuations(data.test, 40, 4, 12)
    q = J.text_quality(judge, other, ref, 4, seed=0, num_buckets=4)
    assert q["num"] == 40 and q["new"] == 12 and q["clusters"] == 4 and 0 < q["mauve"] <= 1 + 1e-9
    assert q["gen_ppl"] == pytest.approx(2 ** q["gen_bits"]) and 0 < q["distinct_2"] <= 1
    b = J.mauve_bounds(judge, data, 40, 4, 12, seed=0, num_buckets=4)
    assert set(b) >= {"ceiling", "floor"} and b["ceiling"]["num_p"] == b["floor"]["num_q"] == 40
    with pytest.raises(ValueError, match="differ in length"):
        J.text_quality(judge, other[:, :-1], ref, 4)


def test_evaluate_reports_the_judge_and_mauve(built, tmp_path, monkeypatch):
    root, cfg, judge, info = built
    run = tmp_path / "run"
    text = cfg.data.path
    assert main(["train", "--out", str(run), "--no-progress", "--task", "arlm", f"data.path={text}",
                 "model.vocab_size=16", "model.seq_len=12", "model.hidden_size=16", "model.num_heads=2",
                 "model.depth=2", "blocks.num_blocks=2", "train.steps_per_block=2", "train.batch_size=2",
                 "sample.num=0", "sample.prompt_chars=4"]) == 0
    monkeypatch.setattr(J, "JUDGE_PRESET", TINY_JUDGE)  # "auto" finds the tiny judge built above
    ev = tmp_path / "ev"
    assert main(["evaluate", str(run), "--cache-dir", str(root / "cache"), "--prompts", "3", "--new", "5",
                 "--windows", "4", "--bridges", "argmax,sample", "--speed-prompts", "1", "--mauve-prompts", "20",
                 "--mauve-new", "8", "--out", str(ev), "--no-progress"]) == 0
    r = json.loads((ev / "evaluation.json").read_text())
    assert r["judge"]["run"] == info["run"] and r["judge"]["held_out_bpc"] == info["held_out_bpc"]
    assert r["judge"]["bounds"]["ceiling"]["num_p"] == 20 and r["judge"]["bounds"]["floor"]["clusters"] == 2
    for s in r["samples"].values():
        assert s["gen_ppl"] > 1 and s["mauve"]["num_p"] == s["mauve"]["num_q"] == 20 and 0 < s["mauve"]["mauve"] <= 1 + 1e-9
    ev2 = tmp_path / "ev2"
    assert main(["evaluate", str(run), "--judge", "none", "--prompts", "3", "--new", "5", "--windows", "4",
                 "--bridges", "argmax", "--speed-prompts", "1", "--out", str(ev2), "--no-progress"]) == 0
    r = json.loads((ev2 / "evaluation.json").read_text())
    assert "judge" not in r and all("gen_ppl" not in s and "mauve" not in s for s in r["samples"].values())


def _result(run: str, bpc: float, judge: dict) -> dict:
    m = {"mauve": 0.8, "gen_bits": 2.0, "distinct_4": 0.9, "num_p": 500, "num_q": 500, "clusters": 50}
    return {"run": run, "bpc": bpc, "judge": judge, "samples": {"plain": {"mauve": m}}}


def test_the_report_uses_one_independent_judge_and_flags_a_weak_one():
    bounds = {"num": 500, "prompt_len": 32, "new": 128,
              "ceiling": {"mauve": 0.95, "gen_bits": 1.9, "overlap": 0.27, "num_p": 500, "num_q": 500, "clusters": 50},
              "floor": {"mauve": 0.004, "gen_bits": 6.0, "num_p": 500, "num_q": 500, "clusters": 50}}
    judge = {"run": "/cache/judges/shakespeare-judge-0123", "held_out_bpc": 1.6, "steps": 3000,
             "held_out_windows": 871, "seq_len": 128, "bounds": bounds}
    results = {1: _result("/c/B1", 2.0, judge), 3: _result("/c/B3", 2.1, judge)}
    found, lines = J.judge_section({}, results)
    assert found is judge and "held-out BPC 1.6000" in "\n".join(lines) and "WARNING" not in "\n".join(lines)
    table = "\n".join(J.mauve_section(results, judge))
    assert "ceiling: other held-out text (27% of its characters" in table and "| 0.950 |" in table
    assert "floor: unigram draws" in table and "| 0.004 |" in table and "500 vs 500" in table
    assert "B=3, plain" in table and "ceiling above floor" in table
    weak = {**judge, "held_out_bpc": 2.05}
    _, lines = J.judge_section({}, {1: _result("/c/B1", 2.0, weak), 3: _result("/c/B3", 2.1, weak)})
    assert "WARNING: the judge's held-out BPC 2.0500 is NOT below every judged model's: B=1 (2.0000)" in "\n".join(lines)
    bad = {**bounds, "ceiling": {**bounds["ceiling"], "mauve": 0.001}}
    assert "WARNING: MAUVE's ceiling is not above its floor" in "\n".join(J.mauve_section(results, {"bounds": bad}))
    itself = {**judge, "run": "/c/B1"}
    with pytest.raises(ConfigError, match="is one of the compared runs"):
        J.judge_section({}, {1: _result("/c/B1", 2.0, itself), 3: _result("/c/B3", 2.1, itself)})
    with pytest.raises(ConfigError, match="different judges"):
        J.judge_section({}, {1: _result("/c/B1", 2.0, judge), 3: _result("/c/B3", 2.1, weak | {"run": "/x"})})
    none = {B: {k: v for k, v in r.items() if k != "judge"} for B, r in results.items()}
    assert J.judge_section({}, none)[0] is None and J.mauve_section(none, None) == []


class Bigram(torch.nn.Module):
    """A judge whose hidden state at position j is the one-hot vector of the bigram (x_{j-1}, x_j)."""

    def __init__(self, V: int):
        super().__init__()
        self.V = V

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, self.V)

    def hidden(self, tokens):
        prev = torch.cat([tokens[:, :1], tokens[:, :-1]], dim=1)
        return torch.nn.functional.one_hot(prev * self.V + tokens, self.V * self.V).float()


def test_the_bounds_tell_text_from_unigram_noise(tmp_path):
    g = torch.Generator().manual_seed(0)
    words = ["the", "king", "and", "queen", "of", "rome", "shall", "speak"]
    text = " ".join(words[i] for i in torch.randint(len(words), (4000,), generator=g).tolist())
    (tmp_path / "w.txt").write_text(text)
    data = J.get_task("arlm").load_data(run_config(tmp_path / "w.txt", "model.vocab_size=32"))
    b = J.mauve_bounds(J.Judge(Bigram(len(data.vocab)), 16), data, 30, 4, 24, seed=0, num_buckets=3)
    assert b["ceiling"]["mauve"] > 0.8 and b["floor"]["mauve"] < 0.2 and b["ceiling"]["overlap"] == 0
    assert b["floor"]["gen_bits"] == pytest.approx(math.log2(len(data.vocab)))


def test_a_missing_mauve_stops_before_any_work(monkeypatch):
    monkeypatch.setattr(J.extras, "installed", lambda module: module != "mauve")
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[mauve\]' \(or pass --mauve-prompts 0"):
        J.require_mauve()
    assert J.extras.EXTRA_OF["mauve"] == "mauve"


def test_too_little_held_out_text_for_mauve_stops_before_the_judge(built, tmp_path, monkeypatch):
    root, cfg, _, _ = built
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", "--task", "arlm", f"data.path={cfg.data.path}",
                 "model.vocab_size=16", "model.seq_len=12", "model.hidden_size=16", "model.num_heads=2",
                 "model.depth=1", "blocks.num_blocks=1", "model.mode=plain", "train.steps_per_block=1",
                 "train.batch_size=2", "sample.num=0", "sample.prompt_chars=4"]) == 0

    def no_judge(*args, **kwargs):
        raise AssertionError("a judge was looked for")

    monkeypatch.setattr(J, "load_or_train_judge", no_judge)
    with pytest.raises(ConfigError, match="too few for 500 windows of 4 \\+ 128"):
        J.get_task("arlm").evaluate(run, J.get_task("arlm").evaluate_options(windows=2, prompts=2, new=2))
