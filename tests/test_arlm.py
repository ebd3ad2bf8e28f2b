"""The autoregressive language model as a chain of denoising blocks: its mask, its causality, its cache, its task."""

import json
import math
import shutil

import pytest
import torch

from diffusionblocks import checkpoint, pretrained
from diffusionblocks.chain_likelihood import chain_likelihood, next_token_bits, next_token_likelihood
from diffusionblocks.cli import main
from diffusionblocks.config import ConfigError
from diffusionblocks.judge import distinct_n, longest_repeated_run
from diffusionblocks.models.arlm import ARDenoiser, CausalLM, KVCache, training_mask
from diffusionblocks.tasks import apply_overrides, default_config, get_task
from diffusionblocks.tasks.autoregressive import judge_bits
from diffusionblocks.text import shared_windows
from diffusionblocks.token_chain import draw_token, generate_chain, generate_plain

TINY = ["task=arlm", "model.hidden_size=16", "model.num_heads=2", "model.depth=3", "model.seq_len=12",
        "blocks.num_blocks=3", "train.batch_size=4", "train.steps_per_block=3", "train.log_every=1",
        "train.checkpoint_every=3", "train.lr_warmup_steps=1", "sample.num=2", "sample.new_chars=5",
        "sample.prompt_chars=4"]


def test_the_attention_mask_entry_by_entry():
    L = 4
    m = training_mask(L)
    assert m.shape == (2 * L, 2 * L) and m.dtype == torch.bool
    for q in range(2 * L):
        for k in range(2 * L):
            q_noisy, k_noisy, i, j = q < L, k < L, q % L, k % L
            if q_noisy:
                expected = (k_noisy and j == i) or (not k_noisy and j < i)
            else:
                expected = not k_noisy and j <= i
            assert bool(m[q, k]) == expected, (q, k)


def _block(seed: int = 0, depth: int = 2) -> ARDenoiser:
    """A block with every weight random (adaLN-Zero's zeros would hide a leak through a gated path)."""
    g = torch.Generator().manual_seed(seed)
    m = ARDenoiser(11, hidden_size=16, depth=depth, num_heads=2)
    m.initialize_weights(g)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
        m.E.copy_(torch.nn.functional.normalize(torch.randn(11, 16, generator=g), dim=-1))
    return m.eval()


@pytest.mark.parametrize("cut", [0, 3, 6])
def test_the_noisy_stream_never_sees_its_own_or_a_later_token(cut):
    m = _block()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(11, (3, 8), generator=g)
    z, sigma = torch.randn(3, 8, 16, generator=g), torch.rand(3, 8, generator=g) + 0.05
    later = tokens.clone()
    later[:, cut:] = (later[:, cut:] + 1 + torch.randint(10, later[:, cut:].shape, generator=g)) % 11
    noisy_later = z.clone()
    noisy_later[:, cut + 1:] += 1.0  # other positions' noisy inputs must not matter either
    D, logits = m.denoise(z, sigma, tokens)
    D2, logits2 = m.denoise(noisy_later, sigma, later)
    assert torch.allclose(logits[:, :cut + 1], logits2[:, :cut + 1], atol=1e-6)
    assert torch.allclose(D[:, :cut + 1], D2[:, :cut + 1], atol=1e-6)
    if cut < 7:
        assert not torch.allclose(logits[:, cut + 1:], logits2[:, cut + 1:])
    # The training loss sees the same: its gradient reaches no clean embedding of a token at or after the position.
    emb = m.trunk.tok_embed.weight
    emb.grad = None
    _, lg = m.denoise(z, sigma, tokens)
    lg[:, cut].sum().backward()
    used = {int(t) for t in tokens[:, :cut].flatten()}
    assert all(emb.grad[t].abs().sum() == 0 for t in range(11) if t not in used)


def test_the_cached_next_position_equals_the_training_forward():
    m = _block(depth=3)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(11, (2, 9), generator=g)
    z, sigma = torch.randn(2, 9, 16, generator=g), torch.rand(2, 9, generator=g) + 0.05
    D, logits = m.denoise(z, sigma, tokens)
    cache = KVCache(3)
    m.trunk.extend(cache, tokens[:, :3])  # a prompt at once, then a token at a time
    for i in range(3, 9):
        Dn, ln = m.denoise_next(z[:, i], sigma[:, i], cache)
        assert torch.allclose(ln, logits[:, i], atol=1e-5) and torch.allclose(Dn, D[:, i], atol=1e-5)
        m.trunk.extend(cache, tokens[:, i:i + 1])
    with pytest.raises(AssertionError):  # and the check can fail: a token the position must not see
        wrong = KVCache(3)
        m.trunk.extend(wrong, tokens[:, :5])
        assert torch.allclose(m.denoise_next(z[:, 4], sigma[:, 4], wrong)[1], logits[:, 4], atol=1e-5)


def test_the_noisy_stream_after_a_cached_clean_stream_equals_the_training_forward():
    """denoise_cached (the chain likelihood's: the clean stream run once for many chains of the same windows) gives
    denoise's outputs, each row reading the clean row it repeats; a cache of tokens shifted by one does not."""
    m = _block(depth=3)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(11, (2, 9), generator=g)
    z, sigma = torch.randn(6, 9, 16, generator=g), torch.rand(6, 9, generator=g) + 0.05  # 3 chains of 2 windows
    with torch.no_grad():
        D, logits = m.denoise(z, sigma, tokens.repeat(3, 1))
        Dc, lc = m.denoise_cached(z, sigma, m.clean_cache(tokens))
        shifted = m.denoise_cached(z, sigma, m.clean_cache(torch.roll(tokens, -1, 1)))[1]
    assert torch.allclose(lc, logits, atol=1e-5) and torch.allclose(Dc, D, atol=1e-5)
    assert not torch.allclose(shifted, logits, atol=1e-3)  # position i would see token i


def _chain(blocks, cfg):
    from diffusionblocks.blocks import BlockwiseDenoiser

    return BlockwiseDenoiser(blocks, get_task(cfg.task).partition(cfg))


@pytest.mark.parametrize("bridge", ["estimate", "softmax", "argmax", "sample"])
@pytest.mark.parametrize("greedy", [True, False])
def test_generation_with_the_cache_equals_generation_without_it(bridge, greedy):
    cfg = apply_overrides(default_config("arlm"), TINY)
    chain = _chain([_block(seed=b) for b in range(3)], cfg)
    prompts = torch.randint(11, (3, 4), generator=torch.Generator().manual_seed(3))
    kw = dict(window=8, bridge=bridge, greedy=greedy, seeds=[5, 6, 7], temperature=0.8, top_p=0.9)
    # 4 + 14 tokens through a window of 8: the context moves on (and the cache is re-filled) several times.
    fast = generate_chain(chain, prompts, 14, cache=True, **kw)
    slow = generate_chain(chain, prompts, 14, cache=False, **kw)
    assert fast.shape == (3, 18) and torch.equal(fast[:, :4], prompts)
    assert torch.equal(fast, slow)
    one = generate_chain(chain, prompts[1:2], 14, cache=True, **{**kw, "seeds": [6]})
    assert torch.equal(one[0], fast[1])  # a sample does not depend on its batch


def perturbed_causal_lm(g: torch.Generator, scale: float) -> CausalLM:
    """A tiny plain LM (11 tokens, width 16, 2 layers) initialised from g, every weight moved by scale * N(0, 1) so
    that no layer is the identity its zero-initialised gates start as."""
    m = CausalLM(11, hidden_size=16, depth=2, num_heads=2)
    m.initialize_weights(g)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


def test_the_plain_baseline_generates_the_same_with_and_without_the_cache():
    g = torch.Generator().manual_seed(4)
    m = perturbed_causal_lm(g, 0.2)
    prompts = torch.randint(11, (2, 3), generator=g)
    a = generate_plain(m, prompts, 12, window=6, seeds=[1, 2], temperature=1.0)
    b = generate_plain(m, prompts, 12, window=6, seeds=[1, 2], cache=False, temperature=1.0)
    assert torch.equal(a, b)
    tokens = torch.randint(11, (2, 6), generator=g)
    changed = tokens.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 11
    assert torch.allclose(m(tokens)[:, :4], m(changed)[:, :4], atol=1e-6)


def test_readout_greedy_top_p_and_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(4000, 4)
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (draw_token(logits, 1.0, 1.0, True, u) == 0).all()
    counts = torch.bincount(draw_token(logits, 1.0, 1.0, False, u), minlength=4).double() / 4000
    assert torch.allclose(counts, logits[0].softmax(0).double(), atol=0.03)
    top = draw_token(logits, 1.0, 0.7, False, u)  # p = .64, .24, ...: the nucleus of 0.7 is the first two
    assert set(top.tolist()) == {0, 1}
    assert (draw_token(logits, 1e-4, 1.0, False, u) == 0).all()


def test_text_metrics():
    assert distinct_n(["abcd"], 2) == 1.0 and distinct_n(["aaaa"], 2) == pytest.approx(1 / 3)
    assert longest_repeated_run("xabababy") == 6 and longest_repeated_run("aaaa") == 4
    assert longest_repeated_run("abcdef") == 0 and longest_repeated_run("the the the end") == 12


def test_judge_bits_scores_each_continuation_character_once():
    class Uniform(torch.nn.Module):
        def forward(self, tokens):
            self.seen = getattr(self, "seen", 0) + tokens.shape[1]
            return torch.zeros(*tokens.shape, 8)

    texts = torch.randint(8, (3, 40))
    assert judge_bits(Uniform(), texts, 5, 12) == pytest.approx(3.0)  # log2(8) for every character


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("arlm")
    chain, plain = root / "chain", root / "plain"
    assert main(["train", "--out", str(chain), "--no-progress", *TINY]) == 0
    assert main(["train", "--out", str(plain), "--no-progress", *TINY, "blocks.num_blocks=1", "model.mode=plain"]) == 0
    return chain, plain


def test_training_sampling_and_evaluation_through_the_cli(trained, tmp_path, capsys):
    chain, plain = trained
    for run in trained:
        assert (run / "samples.txt").is_file() and (run / "vocab.json").is_file()
    assert [checkpoint.block_step(chain, b) for b in range(3)] == [3, 3, 3]
    out = tmp_path / "s.txt"
    assert main(["sample", str(chain), "--num", "3", "--prompt", "ROMEO", "--new", "6", "--bridge", "softmax",
                 "--out", str(out), "--no-progress"]) == 0
    text = out.read_text()  # three samples of 5 + 6 characters, a blank line between them
    assert text.startswith("ROMEO") and text.count("ROMEO") >= 3 and len(text) == 3 * 11 + 2 * 2 + 1
    ev = tmp_path / "ev"
    assert main(["evaluate", str(chain), "--judge", str(plain), "--prompts", "4", "--new", "6", "--windows", "8",
                 "--speed-prompts", "2", "--mauve-prompts", "20", "--mauve-new", "6", "--out", str(ev),
                 "--no-progress"]) == 0
    r = json.loads((ev / "evaluation.json").read_text())
    assert set(r["samples"]) == {"estimate", "softmax", "argmax", "sample"} and set(r["chain"]) == set(r["samples"])
    for s in r["samples"].values():
        # Whether the cache changed a character is reported, not asserted here: three steps leave the logits nearly
        # uniform, where rounding decides an argmax (test_generation_with_the_cache_equals... asserts it).
        assert isinstance(s["cache_equals_no_cache"], bool) and s["gen_ppl"] > 1 and 0 < s["distinct_2"] <= 1
    assert [row["block"] for row in r["chain"]["argmax"]] == [0, 1, 2]
    # Who decides: the run's bridge's steps, each block's share of the top-1 error its steps removed from chance's.
    d = r["decision"]
    rows = r["chain"][d["bridge"]]
    assert [row["block"] for row in d["chain"]] == [0, 1, 2] and d["chance_error"] == pytest.approx(64 / 65)
    assert all(0 <= row[k] <= 1 for row in rows for k in ("chain_error", "oracle_error"))
    assert d["chain"][0]["removed"] == pytest.approx(d["chance_error"] - rows[0]["chain_error"])
    assert sum(row["removed"] for row in d["oracle"]) == pytest.approx(d["chance_error"] - rows[-1]["oracle_error"])
    for who in (d["chain"], d["oracle"]):  # shares of what the chain removed, where it removed anything
        total = sum(row["removed"] for row in who)
        assert sum(row["share"] for row in who) == pytest.approx(1) if total > 0 else all(
            row["share"] != row["share"] for row in who)
    # The figures are those of the shared windows (8 spread over the held-out split), the run's bridge and steps.
    model, cfg = pretrained.from_pretrained(chain)
    windows = shared_windows(get_task("arlm").load_run_data(cfg, chain).test, cfg.model.seq_len, 8)
    assert r["num_windows"] == 8 and r["bpc"] == pytest.approx(next_token_bits(model, windows), abs=1e-6)
    c = r["chain_likelihood"]
    want = chain_likelihood(model, windows, steps=3, bridge=cfg.sample.bridge, sampler="euler",
                            **get_task("arlm").evaluate_options().chain_kwargs(r["chars_per_token"]))
    assert c["bpc"] == pytest.approx(want["bits"], abs=1e-6) and c["bpc_se"] == pytest.approx(want["se"], abs=1e-6)
    assert "block 0 at sigma_max (1 of 3 layers)" in r["bpc_label"] and "all 3 blocks" in c["label"]
    assert "chain likelihood" in capsys.readouterr().out
    code = main(["evaluate", str(plain), "--judge", str(chain), "--out", str(tmp_path / "x")])
    assert code == 2 and "a judge is a plain run" in capsys.readouterr().err
    code = main(["evaluate", str(chain), "--chain-draws", "1", "--out", str(tmp_path / "y")])
    assert code == 2 and "--chain-draws must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    code = main(["evaluate", str(chain), "--draw-steer", "1", "--out", str(tmp_path / "z")])
    assert code == 2 and "--draw-steer in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
    code = main(["evaluate", str(chain), "--steer", "0.5", "--line-steer", "0.5", "--out", str(tmp_path / "z")])
    assert code == 2 and "--line-steer at least 0 with a sum below 1" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
    code = main(["evaluate", str(chain), "--chain-batch", "-1", "--out", str(tmp_path / "z")])
    assert code == 2 and "--chain-batch at least 0" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
    # --chain-batch reaches the estimator; 0 is the device's default (256 chains on a CPU).
    kw = get_task("arlm").evaluate_options(chain_batch=16).chain_kwargs(1.0)
    assert kw["batch_size"] == 16
    assert get_task("arlm").evaluate_options().chain_kwargs(1.0)["batch_size"] is None
    three = dict(steps=3, bridge=cfg.sample.bridge, draws=2, tolerance=None)
    assert chain_likelihood(model, windows, **three)["bits"] == chain_likelihood(model, windows, batch_size=256,
                                                                                 **three)["bits"]


def test_the_plain_models_likelihood_is_reported_as_exact(trained, tmp_path, capsys):
    """The baseline's own likelihood has no chain and no draws: evaluate says so, not that it is a biased bound."""
    _, plain = trained
    assert main(["evaluate", str(plain), "--judge", "none", "--prompts", "2", "--new", "4", "--windows", "4",
                 "--speed-prompts", "1", "--mauve-prompts", "0", "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  next-token cross-entropy: BPC"))
    assert line.endswith("(exact: no chain, no draws)") and "upper bound" not in line


def test_next_token_bits_of_a_plain_model_is_its_cross_entropy_prefix_by_prefix():
    """The baseline's bits against a computation of each token's probability from its own prefix alone (position j's
    logits are token j + 1's distribution), and their standard error over the windows by hand."""
    g = torch.Generator().manual_seed(8)
    m = perturbed_causal_lm(g, 0.3)

    class Run:
        blocks = [m.eval()]

    x = torch.randint(11, (3, 7), generator=g)
    with torch.no_grad():
        bits = torch.tensor([[-float(m(x[w:w + 1, :j])[0, -1].log_softmax(-1)[x[w, j]]) / math.log(2)
                              for j in range(1, 7)] for w in range(3)])  # (windows, positions 1..6)
    r = next_token_likelihood(Run, x, batch_size=2)
    assert r["bits"] == pytest.approx(float(bits.mean()), abs=1e-5) == next_token_bits(Run, x)
    assert r["se"] == pytest.approx(float(bits.mean(1).std()) / math.sqrt(3), abs=1e-5)
    assert r["bias"] == 0 and r["se_estimator"] == 0  # an exact likelihood: no draws


def test_the_chain_likelihood_is_not_block_zero_alone_when_later_blocks_change_the_estimate():
    """Three random blocks: block 0 at sigma_max and the whole chain's distribution differ by many standard errors;
    a chain of one step is block 0 alone (up to its noise draws)."""
    cfg = apply_overrides(default_config("arlm"), TINY)
    model = _chain([_block(seed=b) for b in range(3)], cfg)
    x = torch.randint(11, (16, 8), generator=torch.Generator().manual_seed(9))
    chain = chain_likelihood(model, x, draws=4, top_k=4)
    first = next_token_likelihood(model, x)
    assert abs(chain["bits"] - first["bits"]) > 6 * chain["se_estimator"]
    one = chain_likelihood(model, x, steps=1, draws=8)
    assert one["top_k"] is None and abs(one["bits"] - first["bits"]) < 4 * (one["se"] + first["se"])


def test_the_compare_report_shows_block_zero_and_the_chain_with_paired_differences(trained, tmp_path):
    from diffusionblocks.tasks import load_config
    from diffusionblocks.tasks.autoregressive import write_arlm_report

    task = get_task("arlm")
    configs, results, artifacts = {}, {}, {}
    for B, run in ((1, trained[1]), (3, trained[0])):
        copy = tmp_path / f"B{B}"
        shutil.copytree(run, copy)
        ev = task.evaluate(copy, task.evaluate_options(prompts=2, new=4, windows=6, speed_prompts=1, bridges="sample",
                                                       chain_draws=2, top_k=2, judge="none"))
        ev.result["train_summary"] = json.loads((copy / "train_summary.json").read_text())
        configs[B], results[B], artifacts[B] = load_config(copy / "config.json"), ev.result, ev.artifacts
    write_arlm_report(tmp_path, configs, results, artifacts)
    report = (tmp_path / "report.md").read_text()
    chain, plain = results[3]["chain_likelihood"], results[1]["chain_likelihood"]
    assert plain["bpc"] == results[1]["bpc"] and plain["bias"] == 0  # the baseline's likelihood is exact
    assert f"| 3 | bridge sample | {results[3]['bpc']:.4f} | {chain['bpc']:.4f} +- {chain['bpc_se']:.4f} |" in report
    want = torch.tensor(chain["per_window"]) - torch.tensor(plain["per_window"])
    assert f"{float(want.mean()):+.4f} +- {float(want.std()) / math.sqrt(6):.4f}" in report
    assert "## Held-out likelihood" in report and "block 0 at sigma_max (1 of 3 layers)" in report


def test_config_rules():
    with pytest.raises(ConfigError, match="needs blocks.num_blocks=1"):
        apply_overrides(default_config("arlm"), ["model.mode=plain"])
    with pytest.raises(ConfigError, match="even head width"):
        apply_overrides(default_config("arlm"), ["model.hidden_size=12", "model.num_heads=4"])
    with pytest.raises(ConfigError, match="sample.bridge"):
        apply_overrides(default_config("arlm"), ["sample.bridge=euler"])
    assert default_config("arlm").blocks.gamma == 0.1


def test_every_trained_block_is_causal_in_training_and_with_the_cache(trained):
    chain, _ = trained
    model, cfg = pretrained.from_pretrained(chain)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(cfg.model.vocab_size, (2, cfg.model.seq_len), generator=g)
    later = tokens.clone()
    later[:, 6:] = torch.randint(cfg.model.vocab_size, later[:, 6:].shape, generator=g)
    for b, blk in enumerate(model.blocks):
        z = torch.randn(2, cfg.model.seq_len, cfg.model.hidden_size, generator=g)
        sigma = torch.full((2, cfg.model.seq_len), blk.sigma_max)
        with torch.no_grad():
            _, logits = blk.denoise(z, sigma, tokens)
            _, logits_later = blk.denoise(z, sigma, later)
            assert torch.allclose(logits[:, :7], logits_later[:, :7], atol=1e-6), b
            cache = KVCache(len(blk.trunk.layers))
            blk.trunk.extend(cache, later[:, :6])
            _, next_logits = blk.denoise_next(z[:, 6], sigma[:, 6], cache)
            assert torch.allclose(next_logits, logits[:, 6], atol=1e-5), b


def test_a_bpe_tokenizer_trained_on_the_corpus(tmp_path):
    from diffusionblocks.text import TextConfig, load_text, load_vocabulary

    cfg = TextConfig(tokenizer="bpe", bpe_vocab_size=300)
    data = load_text(cfg, 16)
    assert len(data.vocab) == 300 and torch.equal(data.train.tokens, load_text(cfg, 16).train.tokens)  # deterministic
    text = "KING RICHARD III:\nNow is the winter of our discontent"
    assert data.vocab.decode(data.vocab.encode(text)) == text
    data.vocab.save(tmp_path / "vocab.json")
    assert torch.equal(load_vocabulary(tmp_path / "vocab.json").encode(text), data.vocab.encode(text))
    assert 1.2 < data.test.chars_per_token < 3  # merges of characters: fewer tokens than characters
    assert load_text(TextConfig(), 16).test.chars_per_token == 1.0


def test_a_bpe_run_reports_bits_per_character(tmp_path):
    run = tmp_path / "bpe"
    bpe = [*TINY, "data.tokenizer=bpe", "data.bpe_vocab_size=300", "model.vocab_size=300", "model.hidden_size=32"]
    assert main(["train", "--out", str(run), "--no-progress", *bpe]) == 0
    ev = tmp_path / "ev"
    assert main(["evaluate", str(run), "--prompts", "2", "--new", "4", "--windows", "4", "--bridges", "argmax",
                 "--speed-prompts", "1", "--chain-draws", "2", "--top-k", "2", "--judge", "none", "--out", str(ev),
                 "--no-progress"]) == 0
    r = json.loads((ev / "evaluation.json").read_text())
    assert r["bpc"] == pytest.approx(r["bits_per_token"] / r["chars_per_token"]) and r["chars_per_token"] > 1
    with pytest.raises(ConfigError, match="for the arlm task"):
        apply_overrides(default_config("mdlm"), ["data.tokenizer=bpe"])
    code = main(["train", "--out", str(tmp_path / "small"), *bpe, "model.vocab_size=100"])
    assert code == 2
