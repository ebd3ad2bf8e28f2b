"""The masked-diffusion language model task: masking schedule, ELBO, sampling, text data, and the core's
guarantees (schedules, resume after a kill, retraining one block) holding for it."""

import math
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import assert_schedules_agree, kill_training_once
from torch import nn

from diffusionblocks import checkpoint
from diffusionblocks.blocks import BlockwiseDenoiser
from diffusionblocks.cli import main
from diffusionblocks.config import ConfigError
from diffusionblocks.noise import MaskingTime, Partition
from diffusionblocks.tasks import apply_overrides, default_config, get_task
from diffusionblocks.tasks.masked_diffusion import evaluate_bpc, sample_text
from diffusionblocks.text import TextConfig, load_text, load_vocabulary, read_text8

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
TINY = ["task=mdlm", f"data.path={SHAKESPEARE}", "model.seq_len=32", "model.hidden_size=32", "model.num_heads=2",
        "model.depth=3", "blocks.num_blocks=3", "train.batch_size=8", "train.steps_per_block=6", "train.log_every=2",
        "train.checkpoint_every=3", "train.lr_warmup_steps=2", "sample.num=2", "sample.steps=8"]


@pytest.fixture
def cfg():
    return apply_overrides(default_config(), TINY)


@pytest.fixture(scope="module")
def shakespeare():
    return load_text(TextConfig(path=str(SHAKESPEARE)), 32)


# ---- the masking schedule and the ELBO


def test_elbo_weight_and_partition_match_closed_forms():
    def elbo_weight(axis, t):  # -alpha'(t) / (1 - alpha(t)), the ELBO integrand's weight
        return axis.density(t) / (1 - axis.alpha(t))

    t = torch.tensor([0.1, 0.25, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(elbo_weight(MaskingTime("linear"), t), 1 / t)
    cos = MaskingTime("cosine")
    assert torch.allclose(elbo_weight(cos, t), math.pi / 2 * torch.tan(math.pi / 2 * (1 - t)))
    for B in (2, 3, 4):
        assert torch.allclose(Partition(MaskingTime(), B, gamma=0).boundaries, torch.arange(B + 1, dtype=torch.float64) / B)
        # Equal decrements of alpha under the cosine schedule: alpha(t_k) = 1 - k / B.
        s = Partition(cos, B, gamma=0).boundaries
        assert torch.allclose(cos.alpha(s), 1 - torch.arange(B + 1, dtype=torch.float64) / B)
    p = Partition(MaskingTime(), 3, gamma=0.05)
    assert p.block_range(0) == pytest.approx((2 / 3, 1.0)) and int(p.owner(torch.tensor([0.99]))[0]) == 0
    assert p.training_range(1) == pytest.approx((1 / 3 - 0.05 / 3, 2 / 3 + 0.05 / 3))


def test_masking_rate_is_one_minus_alpha(cfg, shakespeare):
    block = get_task(cfg.task).build_block(cfg, 0, torch.Generator().manual_seed(0))
    seen = {}
    block.forward = lambda x, t: seen.setdefault("x", x) is None or torch.zeros(*x.shape, 65)  # record the input
    tokens = shakespeare.train.tokens[:32].repeat(4000, 1)  # (4000, 32)
    for t, rate in [(1.0, 1.0), (0.0, 0.0), (0.3, 0.3), (0.8, 0.8)]:
        seen.clear()
        block.loss(tokens, torch.full((4000,), t), torch.rand(tokens.shape, generator=torch.Generator().manual_seed(1)))
        masked = (seen["x"] == block.mask_id).double().mean()
        assert abs(float(masked) - rate) < 0.005, (t, float(masked))


class MarginalBlock(nn.Module):
    """Predicts the same distribution p at every masked position, whatever it sees."""

    def __init__(self, p: torch.Tensor):
        super().__init__()
        self.register_buffer("logp", p.log())
        self.mask_id = len(p)

    def forward(self, x, t):
        return self.logp.expand(*x.shape, -1)


def test_bpc_of_the_true_marginal_is_the_entropy_and_of_an_untrained_model_log2_vocab(cfg):
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    entropy = float(-(p * p.log2()).sum())  # 1.75 bits
    windows = torch.multinomial(p, 400 * 64, replacement=True, generator=torch.Generator().manual_seed(0)).view(400, 64)
    partition = Partition(MaskingTime(), 3, gamma=0.05)
    model = BlockwiseDenoiser([MarginalBlock(p) for _ in range(3)], partition)
    r = evaluate_bpc(model, windows, strata=12, repeats=4)
    assert abs(r["bpc"] - entropy) < 4 * r["bpc_se"] + 0.01, r
    assert sum(r["bpc_per_block"]) == pytest.approx(r["bpc"], rel=1e-9)
    # A fresh block predicts the uniform distribution (zero head): log2(V) bits per character.
    blocks = [get_task(cfg.task).build_block(cfg, b, torch.Generator().manual_seed(b)) for b in range(3)]
    tokens = torch.randint(65, (100, 32), generator=torch.Generator().manual_seed(1))
    r = evaluate_bpc(BlockwiseDenoiser(blocks, get_task(cfg.task).partition(cfg)).eval(), tokens, strata=6, repeats=3)
    assert abs(r["bpc"] - math.log2(65)) < 4 * r["bpc_se"] + 0.01, r


def test_sampling_keeps_what_is_given_and_never_overwrites_the_prompt(cfg):
    blocks = [get_task(cfg.task).build_block(cfg, b, torch.Generator().manual_seed(b)) for b in range(3)]
    model = BlockwiseDenoiser(blocks, get_task(cfg.task).partition(cfg)).eval()
    given = torch.randint(65, (32,), generator=torch.Generator().manual_seed(0))
    out = sample_text(model, 3, 32, steps=8, prompt=given, seed=0)
    assert torch.equal(out, given.expand(3, 32))
    prompt = given[:10]
    out = sample_text(model, 5, 32, steps=8, prompt=prompt, seed=1)
    assert torch.equal(out[:, :10], prompt.expand(5, 10)) and bool((out < 65).all())  # all unmasked
    assert torch.equal(out, sample_text(model, 5, 32, steps=8, prompt=prompt, seed=1, batch_size=2))


# ---- data


def test_text8_reader_splits_a_zip_as_usual(tmp_path):
    text = "".join("abcdefghijklmnopqrstuvwxyz "[i % 27] for i in range(2000))
    with zipfile.ZipFile(tmp_path / "text8.zip", "w") as z:
        z.writestr("text8", text)
    train_part, test_part = read_text8(tmp_path / "text8.zip")
    assert train_part == text[:1800] and test_part == text[1900:]  # 90% train, 5% validation skipped, 5% test
    data = load_text(TextConfig(path=str(tmp_path / "text8.zip"), format="text8"), 32)
    assert len(data.vocab) == 27 and data.vocab.decode(data.test.tokens) == test_part
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="is not a zip file"):
        load_text(TextConfig(path=str(tmp_path / "bad.zip"), format="text8"), 32)


def test_vocabulary_round_trip(tmp_path, shakespeare):
    v = shakespeare.vocab
    assert len(v) == 65 and v.decode(v.encode("ROMEO:\nO!")) == "ROMEO:\nO!"
    v.save(tmp_path / "vocab.json")
    assert load_vocabulary(tmp_path / "vocab.json").chars == v.chars


@pytest.mark.parametrize("content,overrides,message", [
    (b"\xff\xfe caf\xe9", [], "is not UTF-8 text"),
    (b"", [], "is empty"),
    (b"To be, or not to be", [], "fewer than one sequence of model.seq_len=32"),
    (None, ["model.vocab_size=20"], "has 65 distinct characters but model.vocab_size=20"),
    (None, ["model.seq_len=1"], "model.seq_len is too small"),
    (None, ["data.path=/no/such/file.txt"], "is not a file"),
])
def test_bad_text_input_stops_before_training_with_one_message(tmp_path, capsys, content, overrides, message):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
        overrides = [f"data.path={path}", *overrides]
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", *TINY, *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not run.exists()


# ---- the core's guarantees, for this task


def test_sequential_and_interleaved_give_identical_weights(cfg, shakespeare):
    assert_schedules_agree(cfg, shakespeare.train)


def test_cli_train_sample_evaluate_and_bad_prompt(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", *TINY]) == 0
    assert (run / "vocab.json").is_file() and (run / "samples.txt").is_file()
    out = tmp_path / "s.txt"
    assert main(["sample", str(run), "--num", "3", "--prompt", "ROMEO:", "--steps", "4", "--out", str(out)]) == 0
    paragraphs = out.read_text(encoding="utf-8").split("\n\n")
    assert len(paragraphs) >= 3 and all(p.startswith("ROMEO:") for p in paragraphs[:3])
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", "\u00e9t\u00e9", "--out", str(tmp_path / "x.txt")]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err
    assert main(["sample", str(run), "--out", str(tmp_path / "x.png")]) == 2
    capsys.readouterr()
    for verb, args, message in [("sample", ["--temperature", "nan"], "--temperature must be a positive finite number"),
                                ("sample", ["--steps", "-1"], "--steps must be >= 0 (0: model.seq_len steps), got -1"),
                                ("evaluate", ["--steps", "-2"], "--steps must be >= 0 (0: model.seq_len steps), got -2"),
                                ("evaluate", ["--strata", "0"], "--strata must be at least 1, got 0")]:
        out_args = ["--out", str(tmp_path / ("y.txt" if verb == "sample" else "ev"))]
        assert main([verb, str(run), *args, *out_args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "y.txt").exists() and not (tmp_path / "ev").exists()
    assert main(["evaluate", str(run), "--windows", "8", "--repeats", "2", "--strata", "3", "--no-progress"]) == 0
    assert "held-out BPC" in capsys.readouterr().out
    assert main(["status", str(run)]) == 0 and "block 0 (t 0.667-1)" in capsys.readouterr().out


def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path):
    args = [*TINY, "train.steps_per_block=40", "train.checkpoint_every=5", "sample.num=0"]
    ref = tmp_path / "ref"
    assert main(["train", "--out", str(ref), "--no-progress", *args]) == 0
    run = tmp_path / "killed"
    assert 5 <= kill_training_once(run, args, block=1, min_step=5) < 40
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    for b in range(3):
        a, c = (checkpoint.load_train_state(r, b)["model"] for r in (ref, run))
        assert all(torch.equal(a[k], c[k]) for k in a), b


def test_retraining_one_block_leaves_the_others_byte_identical(tmp_path):
    src = tmp_path / "src"
    assert main(["train", "--out", str(src), "--no-progress", *TINY]) == 0
    new = tmp_path / "new"
    assert main(["train", "--from", str(src), "--blocks", "1", "--reinit", "--out", str(new), "--no-progress",
                 "train.steps_per_block=4"]) == 0
    for b in (0, 2):
        for path in (checkpoint.block_weights_path, checkpoint.block_state_path):
            assert path(new, b).read_bytes() == path(src, b).read_bytes()
    assert checkpoint.block_step(new, 1) == 4 and (new / "vocab.json").is_file()


def test_task_is_registered_and_its_config_round_trips():
    cfg = default_config("mdlm")
    assert get_task("mdlm").noise_symbol == "t" and cfg.noise.schedule == "linear"
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    assert "sigma_max" not in cfg.to_json()
