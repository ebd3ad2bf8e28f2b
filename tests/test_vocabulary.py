"""A text run owns its vocabulary: vocab.json is written once, and every later reading of data goes through it.

Each test is a row of issue 24: what was silently wrong (ids that changed meaning, characters dropped, a crash
after training) now either works through the run's vocabulary or stops with one line and exit 2 before
anything is written or trained.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from diffusionblocks import checkpoint, pretrained
from diffusionblocks.cli import main
from diffusionblocks.config import ConfigError
from diffusionblocks.tasks import read_config
from diffusionblocks.text import TextConfig, Vocabulary, load_text, usable_logits, vocabulary_difference

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
COMMON = ["model.seq_len=16", "model.hidden_size=16", "model.num_heads=2", "train.batch_size=4",
          "train.steps_per_block=2", "train.log_every=1", "train.checkpoint_every=2", "train.lr_warmup_steps=1",
          "sample.num=2"]
TASKS = {
    "mdlm": ["task=mdlm", "model.depth=2", "blocks.num_blocks=2", "sample.steps=4"],
    "arlm": ["task=arlm", "model.depth=2", "blocks.num_blocks=2", "sample.new_chars=4", "sample.prompt_chars=4"],
    "recurrent": ["task=recurrent", "model.mean_recurrence=2", "model.bptt=1", "sample.new_chars=4",
                  "sample.prompt_chars=4"],
}


def args(task: str, path: Path, *more: str) -> list[str]:
    return [*COMMON, *TASKS[task], f"data.path={path}", *more]


def refused(capsys, argv: list[str], *fragments: str) -> str:
    """Runs the command, which must stop with exit 2 and one line holding every fragment; returns the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(f in err[0] for f in fragments), err
    return err[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The first 20,000 characters of tinyshakespeare (58 distinct, all of the held-out ones in the training part)."""
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus, one_thread) -> dict[str, Path]:
    """A trained run of each text task on the corpus, and a plain arlm judge."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for task in TASKS:
        out[task] = root / task
        assert main(["train", "--out", str(out[task]), "--no-progress", *args(task, corpus)]) == 0
    out["judge"] = root / "judge"
    assert main(["train", "--out", str(out["judge"]), "--no-progress",
                 *args("arlm", corpus, "blocks.num_blocks=1", "model.mode=plain")]) == 0
    return out


def edited(tmp_path: Path, corpus: Path, edit) -> Path:
    path = tmp_path / "edited.txt"
    path.write_text(edit(corpus.read_text(encoding="utf-8")), encoding="utf-8")
    return path


def train_only(text: str, old: str, new: str) -> str:
    """The text with `old` replaced by `new` in its training part only (the same length: the same held-out part)."""
    cut = int(len(text) * 0.9)
    return text[:cut].replace(old, new) + text[cut:]


def held_out_bpc(capsys, run: Path, out: Path) -> float:
    assert main(["evaluate", str(run), "--windows", "8", "--repeats", "2", "--strata", "2", "--num", "1",
                 "--judge", "none", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    return json.loads((out / "evaluation.json").read_text())["bpc"]


# ---- the vocabulary is pinned to the run


def test_from_reads_new_data_through_the_source_vocabulary_and_refuses_characters_it_lacks(runs, corpus, tmp_path,
                                                                                          capsys):
    src = runs["mdlm"]
    shifted = edited(tmp_path, corpus, lambda t: t.replace("A", "~"))
    new = tmp_path / "new"
    refused(capsys, ["train", "--from", str(src), "--blocks", "1", "--out", str(new), f"data.path={shifted}"],
            "'~'", "outside the run's vocabulary", str(src / "vocab.json"))
    assert not new.exists()
    # Without 'A' (its id and every id after it would shift in a vocabulary made afresh): read through the source's.
    fewer = edited(tmp_path, corpus, lambda t: t.replace("A", "a"))
    assert main(["train", "--from", str(src), "--blocks", "1", "--out", str(new), "--no-progress",
                 f"data.path={fewer}"]) == 0
    assert (new / "vocab.json").read_bytes() == (src / "vocab.json").read_bytes()
    assert checkpoint.block_weights_path(new, 0).read_bytes() == checkpoint.block_weights_path(src, 0).read_bytes()
    assert held_out_bpc(capsys, new, tmp_path / "ev") > 0
    refused(capsys, ["train", "--from", str(runs["arlm"]), "--blocks", "1", "--out", str(tmp_path / "bpe"),
                     "data.tokenizer=bpe"], "data.tokenizer='bpe', but the run's vocabulary", "is of characters")
    assert not (tmp_path / "bpe").exists()


def test_resume_reads_the_edited_data_through_the_run_vocabulary_written_once(corpus, tmp_path, capsys, one_thread):
    data = tmp_path / "data.txt"
    data.write_text(corpus.read_text(encoding="utf-8"), encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", *args("arlm", data, "sample.num=0")]) == 0
    vocab = run / "vocab.json"
    before = vocab.read_bytes(), vocab.stat().st_mtime_ns
    data.write_text(data.read_text(encoding="utf-8").replace("A", "a"), encoding="utf-8")
    assert main(["train", "--resume", str(run), "--no-progress", "train.steps_per_block=4"]) == 0
    assert (vocab.read_bytes(), vocab.stat().st_mtime_ns) == before
    assert [checkpoint.block_step(run, b) for b in range(2)] == [4, 4]
    data.write_text(data.read_text(encoding="utf-8").replace("B", "~"), encoding="utf-8")
    refused(capsys, ["train", "--resume", str(run), "--no-progress", "train.steps_per_block=6"], "'~'",
            "outside the run's vocabulary")
    assert [checkpoint.block_step(run, b) for b in range(2)] == [4, 4]
    assert (vocab.read_bytes(), vocab.stat().st_mtime_ns) == before


def test_evaluate_reads_the_edited_data_through_the_run_vocabulary(runs, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["mdlm"], run)
    text = corpus.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    before = held_out_bpc(capsys, run, tmp_path / "before")
    # The file edited in place: the same held-out text, a training part without one of its characters (a
    # vocabulary made afresh from it would shift the ids after that character).
    only_in_training = sorted(set(text[:cut]) - set(text[cut:]))[0]
    corpus_copy = tmp_path / "corpus.txt"
    corpus_copy.write_text(train_only(text, only_in_training, " "), encoding="utf-8")
    assert len(Vocabulary(corpus_copy.read_text(encoding="utf-8")[:cut])) < len(Vocabulary(text[:cut]))
    cfg_path = run / "config.json"
    cfg_path.write_text(cfg_path.read_text().replace(json.dumps(str(corpus)), json.dumps(str(corpus_copy))))
    assert read_config(run).data.path == str(corpus_copy)
    assert held_out_bpc(capsys, run, tmp_path / "after") == before
    corpus_copy.write_text(text[:-1] + "~", encoding="utf-8")
    refused(capsys, ["evaluate", str(run), "--out", str(tmp_path / "x"), "--no-progress"], "'~'",
            "outside the run's vocabulary")
    assert not (tmp_path / "x").exists()


def test_compose_refuses_another_vocabulary_naming_the_first_id_that_differs(runs, corpus, tmp_path, capsys):
    lower = tmp_path / "lower"
    lower_text = edited(tmp_path, corpus, str.lower)
    assert main(["train", "--out", str(lower), "--no-progress", *args("mdlm", lower_text)]) == 0
    out = tmp_path / "mix"
    # '!' and other punctuation sort first; the first letter is where the two vocabularies part.
    first = next(i for i, (a, b) in enumerate(zip(Vocabulary(corpus.read_text()[:18_000]).chars,
                                                   Vocabulary(lower_text.read_text()[:18_000]).chars)) if a != b)
    refused(capsys, ["compose", "--block", f"0={runs['mdlm']}", "--block", f"1={lower}", "--out", str(out)],
            "another vocabulary", f"id {first} is ", f"in {str(runs['mdlm'])!r} but ", f"in {str(lower)!r}")
    assert not out.exists()


def test_a_composed_text_run_samples_and_evaluates_through_its_sources_vocabulary(runs, corpus, tmp_path, capsys):
    src = runs["mdlm"]
    out = tmp_path / "composed"
    # data.* overridden with a file of fewer characters: the sources' vocabulary still governs.
    fewer = edited(tmp_path, corpus, lambda t: t.replace("A", "a"))
    assert main(["compose", "--block", f"0={src}", "--block", f"1={src}", "--out", str(out),
                 f"data.path={fewer}"]) == 0
    assert (out / "vocab.json").read_bytes() == (src / "vocab.json").read_bytes()
    assert main(["sample", str(out), "--num", "2", "--prompt", "ROMEO", "--steps", "4",
                 "--out", str(tmp_path / "s.txt")]) == 0
    assert (tmp_path / "s.txt").read_text(encoding="utf-8").startswith("ROMEO")
    assert held_out_bpc(capsys, out, tmp_path / "ev") > 0
    shifted = edited(tmp_path, corpus, lambda t: t.replace("A", "~"))
    refused(capsys, ["compose", "--block", f"0={src}", "--block", f"1={src}", "--out", str(tmp_path / "bad"),
                     f"data.path={shifted}"], "'~'", "outside the run's vocabulary")
    assert not (tmp_path / "bad").exists()


def test_a_judge_with_another_vocabulary_is_refused(runs, corpus, tmp_path, capsys):
    judge = tmp_path / "judge"
    lower = edited(tmp_path, corpus, str.lower)
    size = len(Vocabulary(lower.read_text()))
    assert main(["train", "--out", str(judge), "--no-progress",
                 *args("arlm", lower, "blocks.num_blocks=1", "model.mode=plain", f"model.vocab_size={size}")]) == 0
    for task, extra in (("arlm", ["--bridges", "argmax", "--speed-prompts", "1"]),
                        ("recurrent", ["--iterations", "1", "--mauve-prompts", "0"])):
        ev = tmp_path / f"ev-{task}"
        refused(capsys, ["evaluate", str(runs[task]), "--judge", str(judge), "--prompts", "2", "--new", "3",
                         "--windows", "2", *extra, "--out", str(ev), "--no-progress"],
                f"--judge {judge}: its vocabulary is not the run's: id ")
        assert not ev.exists()
    ev = tmp_path / "ev"  # the judge of the same vocabulary is taken
    assert main(["evaluate", str(runs["arlm"]), "--judge", str(runs["judge"]), "--prompts", "2", "--new", "3",
                 "--windows", "2", "--bridges", "argmax", "--speed-prompts", "1", "--mauve-prompts", "0", "--out",
                 str(ev), "--no-progress"]) == 0
    assert json.loads((ev / "evaluation.json").read_text())["samples"]["argmax"]["gen_ppl"] > 1


def test_vocabulary_difference_names_the_first_id_that_means_another_token(tmp_path):
    for name, chars in (("a", "abYZ"), ("b", "abY~"), ("c", "abc"), ("d", "cba"), ("e", "abcd")):
        (tmp_path / name).mkdir()
        Vocabulary(chars).save(tmp_path / name / "vocab.json")
    a, b, c, d, e = (tmp_path / n / "vocab.json" for n in "abcde")
    name = {p: repr(str(p.parent)) for p in (a, b, c, d, e)}
    assert vocabulary_difference(a, b) == f"id 1 is 'Z' in {name[a]} but 'a' in {name[b]}"  # sorted: YZab, Yab~
    assert vocabulary_difference(c, e) == f"id 3 is no token in {name[c]} but 'd' in {name[e]}"
    assert vocabulary_difference(c, d) is None  # the same characters: the same ids
    with pytest.raises(ConfigError, match="is missing: the run's vocabulary"):
        vocabulary_difference(a, tmp_path / "vocab.json")


# ---- a corpus with fewer characters (or a BPE with fewer tokens) than model.vocab_size


@pytest.mark.parametrize("task", list(TASKS))
def test_a_corpus_with_fewer_characters_than_vocab_size_trains_samples_and_evaluates(task, corpus, tmp_path, capsys,
                                                                                   one_thread):
    lower = edited(tmp_path, corpus, str.lower)
    chars = set(lower.read_text(encoding="utf-8"))
    assert len(chars) < 40  # model.vocab_size is 65
    run = tmp_path / "run"
    # An untrained model's draws are nearly uniform over the 65 ids: without the restriction, most are not characters.
    assert main(["train", "--out", str(run), "--no-progress", *args(task, lower, "train.steps_per_block=1",
                                                                   "sample.num=4")]) == 0
    assert (run / "train_summary.json").is_file()
    assert set((run / "samples.txt").read_text(encoding="utf-8")) <= chars | {"\n"}
    out = tmp_path / "s.txt"
    assert main(["sample", str(run), "--num", "3", "--out", str(out), "--no-progress"]) == 0
    assert set(out.read_text(encoding="utf-8")) <= chars | {"\n"}
    ev = {"mdlm": ["--windows", "4", "--strata", "2", "--repeats", "2", "--num", "2", "--judge", "none"],
          "arlm": ["--windows", "4", "--prompts", "2", "--new", "3", "--bridges", "sample", "--speed-prompts", "1",
                   "--judge", "none"],
          "recurrent": ["--windows", "4", "--prompts", "2", "--new", "3", "--iterations", "1", "--judge", "none"]}[task]
    assert main(["evaluate", str(run), *ev, "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    assert (tmp_path / "ev" / "evaluation.json").is_file()


def test_usable_logits_leave_a_full_vocabulary_alone_and_never_draw_an_id_beyond_it():
    logits = torch.randn(3, 5, 8)
    assert usable_logits(logits, None) is logits and usable_logits(logits, 8) is logits
    cut = usable_logits(logits, 5)
    assert torch.equal(cut[..., :5], logits[..., :5]) and torch.isneginf(cut[..., 5:]).all()
    assert torch.softmax(cut, -1)[..., 5:].sum() == 0


def test_a_bpe_smaller_than_asked_says_so_and_samples_only_its_tokens(corpus, tmp_path, capsys, caplog, one_thread):
    from diffusionblocks.tasks.autoregressive import generate_text

    small = tmp_path / "small.txt"
    small.write_text(corpus.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    run = tmp_path / "bpe"
    caplog.set_level("INFO")
    assert main(["train", "--out", str(run), "--no-progress", *args("arlm", small, "data.tokenizer=bpe",
                 "data.bpe_vocab_size=2000", "model.vocab_size=2000", "train.steps_per_block=1")]) == 0
    vocab = json.loads((run / "vocab.json").read_text())
    size = len(json.loads(vocab["bpe"])["model"]["vocab"])
    assert size < 2000
    assert f"data.bpe_vocab_size=2000: the training text makes a BPE of only {size} tokens" in caplog.text
    assert f"ids {size}..1999 of model.vocab_size=2000 mean nothing and are never sampled" in caplog.text
    model, cfg = pretrained.from_pretrained(run)
    prompts = torch.zeros(4, 2, dtype=torch.long)
    ids = generate_text(model, cfg, prompts, 20, seeds=list(range(4)), num_tokens=size)
    assert int(ids.max()) < size
    assert int(generate_text(model, cfg, prompts, 20, seeds=list(range(4))).max()) >= size  # what it would draw
    assert main(["sample", str(run), "--num", "2", "--new", "5", "--out", str(tmp_path / "s.txt"),
                 "--no-progress"]) == 0


# ---- inputs checked before any training


def test_held_out_text_with_too_few_prompt_windows_is_refused_before_training(corpus, tmp_path, capsys, one_thread):
    small = tmp_path / "small.txt"
    text = corpus.read_text(encoding="utf-8")
    small.write_text(text[:360] + text[:40], encoding="utf-8")  # 40 held-out characters, all of them seen before
    for task in ("arlm", "recurrent"):
        run = tmp_path / task
        refused(capsys, ["train", "--out", str(run), "--no-progress", *args(task, small, "sample.prompt_chars=16",
                                                                            "sample.num=4")],
                "the held-out text has 2 windows of sample.prompt_chars=16 tokens, fewer than sample.num=4 prompts")
        assert not run.exists()
    run = tmp_path / "arlm"
    assert main(["train", "--out", str(run), "--no-progress", *args("arlm", small, "sample.num=0")]) == 0
    refused(capsys, ["train", "--resume", str(run), "--no-progress", "train.steps_per_block=4",
                     "sample.num=4", "sample.prompt_chars=16"], "fewer than sample.num=4 prompts")
    assert checkpoint.block_step(run, 0) == 2 and read_config(run).sample.num == 0
    mdlm = tmp_path / "mdlm"
    refused(capsys, ["train", "--out", str(mdlm), "--no-progress", *args("mdlm", small, "sample.prompt=caf\u00e9")],
            "sample.prompt has character(s) '\u00e9' outside the vocabulary")
    refused(capsys, ["train", "--out", str(mdlm), "--no-progress", *args("mdlm", small, "sample.prompt=" + "a" * 16)],
            "sample.prompt has 16 characters; model.seq_len=16 leaves no room to sample")
    assert not mdlm.exists()


def test_held_out_characters_missing_from_the_training_part_are_refused_before_training(corpus, tmp_path, capsys):
    text = corpus.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    path = tmp_path / "upper.txt"
    path.write_text(text[:cut] + "Zq~" * 10 + text[cut + 30:], encoding="utf-8")
    run = tmp_path / "run"
    refused(capsys, ["train", "--out", str(run), "--no-progress", *args("mdlm", path)],
            "20 of the 2000 held-out characters (1%) are 'Z~'", "the training part (the vocabulary) never has")
    assert not run.exists()
    with pytest.raises(ConfigError, match="held-out characters"):
        load_text(TextConfig(path=str(path)), 16)


@pytest.mark.parametrize("task", ["arlm", "recurrent"])
def test_evaluate_refuses_a_negative_number_of_windows(runs, task, tmp_path, capsys):
    refused(capsys, ["evaluate", str(runs[task]), "--windows", "-1", "--out", str(tmp_path / "ev")],
            "--windows must be >= 0 (0: all of them), got -1")
    assert not (tmp_path / "ev").exists()


def test_evaluate_with_one_repeat_writes_strict_json_without_a_standard_error(runs, tmp_path, capsys):
    ev = tmp_path / "ev"
    assert main(["evaluate", str(runs["mdlm"]), "--repeats", "1", "--windows", "4", "--strata", "2", "--num", "1",
                 "--judge", "none", "--out", str(ev), "--no-progress"]) == 0
    out = capsys.readouterr().out

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    r = json.loads((ev / "evaluation.json").read_text(), parse_constant=refuse)
    assert r["bpc_se_draws"] is None and r["bpc_se_windows"] is None and r["bpc_se"] > 0 and r["bpc"] > 0
    assert "nan" not in out.lower() and "one estimate, so not split" in out
