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


def test_sampling_takes_one_prompt_per_sample(cfg):
    blocks = [get_task(cfg.task).build_block(cfg, b, torch.Generator().manual_seed(b)) for b in range(3)]
    model = BlockwiseDenoiser(blocks, get_task(cfg.task).partition(cfg)).eval()
    prompts = torch.randint(65, (4, 6), generator=torch.Generator().manual_seed(2))  # (N, P)
    out = sample_text(model, 4, 32, steps=8, prompt=prompts, seed=3, batch_size=3)
    assert torch.equal(out[:, :6], prompts)
    # Sample i is what the one-prompt sampler gives sample i for its prompt: the same randomness, (seed, i).
    for i in range(4):
        assert torch.equal(out[i], sample_text(model, 4, 32, steps=8, prompt=prompts[i], seed=3)[i])
    assert not torch.equal(out[0, 6:], out[1, 6:])
    with pytest.raises(ValueError, match="one prompt per sample: 3 samples"):
        sample_text(model, 3, 32, steps=8, prompt=prompts, seed=3)


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
    assert main(["evaluate", str(run), "--windows", "8", "--repeats", "2", "--strata", "3", "--judge", "none",
                 "--no-progress"]) == 0
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


# ---- the sampler, the router and the ELBO against closed forms (issue 27); each shown to fail on a fault


class RecordingBlock(nn.Module):
    """Predicts fixed logits at every position; appends (its index, its input, its t) to `calls` at every call."""

    def __init__(self, logits: torch.Tensor, b: int, calls: list):
        super().__init__()
        self.register_buffer("logits", logits)
        self.mask_id, self.b, self.calls = len(logits), b, calls

    def forward(self, x, t):
        self.calls.append((self.b, x.clone(), t.clone()))
        return self.logits.expand(*x.shape, -1)


def recording_model(schedule: str, B: int = 3, logits: torch.Tensor = torch.zeros(4)):
    calls: list = []
    blocks = [RecordingBlock(logits, b, calls) for b in range(B)]
    return BlockwiseDenoiser(blocks, Partition(MaskingTime(schedule), B, gamma=0.05)), calls


def grid_t(schedule: str, S: int) -> torch.Tensor:
    """The sampler's t_i, i = 0..S-1, written out: equal steps of alpha, alpha(t_i) = i / S, so t_i = 1 - i / S
    (linear alpha = 1 - t) or 1 - (2 / pi) arccos(1 - i / S) (cosine alpha = 1 - cos(pi/2 (1 - t)))."""
    a = torch.arange(S, dtype=torch.float64) / S
    return 1 - a if schedule == "linear" else 1 - 2 / math.pi * torch.arccos(1 - a)


def shift_grid(monkeypatch, what: str) -> None:
    """Fault injection: the sampler's t (routing by the next step's t) or its alphas one step late."""
    from diffusionblocks.tasks import masked_diffusion as md
    grid = md.unmasking_grid

    def faulty(axis, steps):
        ts, alphas = grid(axis, steps)
        late = lambda v: torch.cat([v[1:], v[-1:]])  # noqa: E731
        return (late(ts), alphas) if what == "t" else (ts, late(alphas))
    monkeypatch.setattr(md, "unmasking_grid", faulty)


FAULTS = {
    "none": lambda mp: None,
    # The reveal probability divided by 1 - alpha(s) (the next step's) instead of 1 - alpha(t).
    "reveal over 1 - alpha_s": lambda mp: mp.setattr(
        "diffusionblocks.tasks.masked_diffusion.reveal_probability",
        lambda a_s, a_t: 1.0 if a_s >= 1 else float((a_s - a_t) / (1 - a_s))),
    "alphas one step late": lambda mp: shift_grid(mp, "alpha"),
    "routed by the next step's t": lambda mp: shift_grid(mp, "t"),
}


def reveal_z_scores(schedule: str, S: int = 8, num: int = 1000, L: int = 64) -> list[float]:
    """Per step i, (revealed - n_i p_i) / sd over num sequences of L positions, where n_i positions are masked
    before the step and p_i = (alpha_{i+1} - alpha_i) / (1 - alpha_i) = 1 / (S - i) (alpha(t_i) = i / S)."""
    model, calls = recording_model(schedule)
    out = sample_text(model, num, L, steps=S, seed=0, batch_size=num)
    masked = [int((x == 4).sum()) for _, x, _ in calls] + [int((out == 4).sum())]
    assert masked[0] == num * L
    if len(calls) != S:  # all revealed before the last step
        return [math.inf]
    z = []
    for i in range(S):
        n, revealed, p = masked[i], masked[i] - masked[i + 1], 1 / (S - i)
        # Given n_i, the revealed count is Binomial(n_i, p_i); at the last step p = 1: all of them, exactly.
        z.append((revealed - n * p) / math.sqrt(n * p * (1 - p)) if p < 1 else (0.0 if revealed == n else math.inf))
    return z


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_sampler_reveals_the_fraction_of_the_schedule_at_every_step(schedule, fault, monkeypatch):
    # |z| < 5 per step: under the right sampler each step's z is about N(0, 1) (n_i >= 8000 positions), so all S
    # steps pass but for a chance of S * 6e-7; each fault moves step 0's count by >= 10 standard deviations.
    FAULTS[fault](monkeypatch)
    z = reveal_z_scores(schedule)
    ok = all(abs(v) < 5 for v in z)
    assert ok == (fault in ("none", "routed by the next step's t")), (fault, z)


@pytest.mark.parametrize("fault", ["none", "routed by the next step's t"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_each_step_runs_the_block_that_owns_its_t(schedule, fault, monkeypatch):
    FAULTS[fault](monkeypatch)
    S, B = 10, 3
    model, calls = recording_model(schedule, B)
    sample_text(model, 8, 32, steps=S, seed=0)
    # Step i has alpha(t_i) = i / S; block b owns alpha in [b / B, (b + 1) / B): the owner is floor(B i / S).
    expected = [B * i // S for i in range(S)]
    routed = [b for b, _, _ in calls]
    seen_t = torch.stack([t[0].double() for _, _, t in calls]) if calls else torch.zeros(0)
    ok = routed == expected and torch.allclose(seen_t, grid_t(schedule, S), atol=1e-6)
    if ok:
        assert [routed.count(b) for b in range(B)] == [4, 3, 3]
    assert ok == (fault != "routed by the next step's t"), (fault, routed)


def test_sampler_draws_tokens_from_the_predicted_distribution():
    p = torch.tensor([0.6, 0.25, 0.1, 0.05], dtype=torch.float64)
    model, _ = recording_model("linear", logits=p.log().float())
    out = sample_text(model, 500, 32, steps=4, seed=0, batch_size=500)
    counts = torch.bincount(out.flatten(), minlength=4).double()
    n = counts.sum()
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 16.3, (chi2, counts / n)  # chi-square, 3 degrees of freedom: P(> 16.3) = 0.001
    # Temperature 0.5 draws from p^2 normalised.
    out = sample_text(model, 500, 32, steps=4, seed=3, batch_size=500, temperature=0.5)
    q = p ** 2 / (p ** 2).sum()
    counts = torch.bincount(out.flatten(), minlength=4).double()
    assert float(((counts - n * q) ** 2 / (n * q)).sum()) < 16.3


class TimeBlock(nn.Module):
    """At every position q_a = a p + (1 - a) u, with a = alpha(t) of the schedule written out and u uniform: a
    model whose prediction moves from uniform (all masked) to p (nothing masked)."""

    def __init__(self, p: torch.Tensor, schedule: str):
        super().__init__()
        self.register_buffer("p", p)
        self.mask_id, self.schedule = len(p), schedule

    def forward(self, x, t):
        t = t.double()
        a = 1 - t if self.schedule == "linear" else 1 - torch.cos(math.pi / 2 * (1 - t))  # (N,)
        q = a[:, None] * self.p + (1 - a[:, None]) / len(self.p)  # (N, V)
        return q.log().float()[:, None].expand(-1, x.shape[1], -1)


def time_block_bits(f: torch.Tensor, p: torch.Tensor, a_lo: float, a_hi: float) -> float:
    """sum_v f_v int_{a_lo}^{a_hi} -log2(a p_v + (1 - a) / V) da: the ELBO's bits from alpha in [a_lo, a_hi],
    since t drawn from -alpha'(t) makes a = alpha(t) uniform and the masked fraction cancels the weight.
    With y = a p_v + (1 - a) / V: int -ln y da = -(y ln y - y) / (p_v - 1 / V)."""
    V = len(p)

    def G(a):
        y = a * p + (1 - a) / V
        return -(y * y.log() - y) / (p - 1 / V)
    return float((f * (G(a_hi) - G(a_lo))).sum() / math.log(2))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_elbo_of_a_time_dependent_model_matches_its_closed_form(schedule):
    # A peaked p: the prediction's cross-entropy falls from 2 bits (a = 0) to 0.8 (a = 1), so evaluating the model
    # at a t off by a stratum's width (1/12) moves the ELBO by ~0.05 bits, 10 standard errors.
    p = torch.tensor([0.85, 0.1, 0.04, 0.01], dtype=torch.float64)
    windows = torch.multinomial(p, 600 * 32, replacement=True, generator=torch.Generator().manual_seed(0)).view(600, 32)
    f = torch.bincount(windows.flatten(), minlength=4).double() / windows.numel()  # the windows' frequencies
    partition = Partition(MaskingTime(schedule), 3, gamma=0.05)
    model = BlockwiseDenoiser([TimeBlock(p, schedule) for _ in range(3)], partition)
    r = evaluate_bpc(model, windows, strata=12, repeats=4)
    exact = time_block_bits(f, p, 0, 1)  # given these windows: only the estimator's draws are random
    assert abs(r["bpc"] - exact) < 4 * r["bpc_se_draws"] + 1e-6, (r["bpc"], exact, r["bpc_se_draws"])
    assert r["bpc_se_draws"] < 0.01 * exact  # tight enough that a wrong weight or a wrong t cannot pass
    # Block b owns alpha in [b / 3, (b + 1) / 3).
    for b, bits in enumerate(r["bpc_per_block"]):
        want = time_block_bits(f, p, b / 3, (b + 1) / 3)
        assert abs(bits - want) < 4 * r["bpc_se_draws"] + 1e-6, (b, bits, want)


def test_standard_error_covers_the_choice_of_windows():
    """Across 40 sets of 40 windows, each window from p_a or p_b (so windows differ, as passages of a text do; their
    mixture is p), the marginal model p's BPC should scatter around the entropy of p by the total standard error
    (z^2 averaging 1), by far more than the estimator's draws alone account for."""
    p = torch.tensor([0.6, 0.2, 0.15, 0.05])
    pa = torch.tensor([0.8, 0.1, 0.05, 0.05])
    pb = 2 * p - pa
    H = float(-(p * p.log2()).sum())  # the cross-entropy of the mixture under p
    model = BlockwiseDenoiser([MarginalBlock(p) for _ in range(3)], Partition(MaskingTime(), 3, gamma=0.05))
    z_total, z_draws, z_repeats = [], [], []
    for s in range(40):
        g = torch.Generator().manual_seed(s)
        which = torch.rand(40, generator=g) < 0.5
        windows = torch.stack([torch.multinomial(pa if a else pb, 16, replacement=True, generator=g) for a in which])
        r = evaluate_bpc(model, windows, strata=4, repeats=4, seed=s)
        assert r["bpc_se"] ** 2 == pytest.approx(r["bpc_se_windows"] ** 2 + r["bpc_se_draws"] ** 2, rel=1e-9) or (
            r["bpc_se_windows"] == 0 and r["bpc_se"] < r["bpc_se_draws"])  # the windows' part estimated below 0
        assert sum(r["bpc_per_window"]) / 40 == pytest.approx(r["bpc"], rel=1e-12)
        z_total.append(((r["bpc"] - H) / r["bpc_se"]) ** 2)
        z_draws.append(((r["bpc"] - H) / r["bpc_se_draws"]) ** 2)
        z_repeats.append(((r["bpc"] - H) / r["bpc_se_repeats"]) ** 2)
    # mean z^2 over 40 sets ~ chi2(40) / 40, sd 0.22: [0.5, 1.8] holds but for a chance below 1% (measured: 0.99).
    assert 0.5 < sum(z_total) / 40 < 1.8, sum(z_total) / 40
    # The draws alone (either estimate of them) understate the error (measured: 4.9 and 8.3).
    assert sum(z_draws) / 40 > 2.5 and sum(z_repeats) / 40 > 2.5, (sum(z_draws) / 40, sum(z_repeats) / 40)
