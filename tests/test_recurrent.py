"""Recurrent depth (issue "Language III"): Huginn's truncated BPTT, the recurrent denoiser that runs its core once
per training step and once per sampler step, and the bits of both against the number of iterations (their
estimators against known answers: tests/test_chain_likelihood.py)."""


import torch

from diffusionblocks.models.arlm import KVCache
from diffusionblocks.models.recurrent import HuginnLM, RecurrentDenoiser, lognormal_poisson


def _randomised(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    model.initialize_weights(g)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _count(layers, into: list):
    return [layer.register_forward_hook(lambda m, args, out: into.append((args[0].shape[1], torch.is_grad_enabled())))
            for layer in layers]


def test_truncated_bptt_stops_the_gradient_where_it_says():
    m = _randomised(HuginnLM(11, hidden_size=16, num_heads=2, prelude=1, core=2, coda=1))
    g = torch.Generator().manual_seed(1)
    tokens, state = torch.randint(11, (2, 6), generator=g), torch.randn(2, 6, 16, generator=g)
    calls = []
    hooks = _count(m.core[:1], calls)
    m.loss(tokens, torch.tensor(5), state, torch.tensor(2)).sum().backward()
    for h in hooks:
        h.remove()
    assert [grad for _, grad in calls] == [False, False, False, True, True]
    grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    # The same gradient as running the first three iterations on detached states by hand.
    m.zero_grad()
    e = m._stack(m.prelude, m.tok_embed(tokens))
    s = state * m.state_std
    for i in range(5):
        s = m.core_step(s.detach() if i < 3 else s, e.detach() if i < 3 else e)
        if i == 2:
            s = s.detach()
    logits = m.head(m.norm_final(m._stack(m.coda, s)))[:, :-1]
    torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").mean(1).sum().backward()
    assert all(torch.allclose(grads[k], p.grad, atol=1e-6) for k, p in m.named_parameters())
    # Without truncation the early iterations do carry gradient.
    m.zero_grad()
    m.loss(tokens, torch.tensor(5), state, torch.tensor(5)).sum().backward()
    assert not all(torch.allclose(grads[k], p.grad, atol=1e-6) for k, p in m.named_parameters())


def test_lognormal_poisson_has_about_the_mean_asked():
    g = torch.Generator().manual_seed(0)
    draws = [lognormal_poisson(8, 0.5, g) for _ in range(4000)]
    assert min(draws) >= 1 and 8.5 < sum(draws) / len(draws) < 9.5  # Poisson(mean 8) + 1


def _denoiser():
    m = RecurrentDenoiser(11, hidden_size=16, num_heads=2, prelude=1, core=2, coda=1)
    _randomised(m)
    with torch.no_grad():
        m.E.copy_(torch.nn.functional.normalize(torch.randn(11, 16, generator=torch.Generator().manual_seed(3)), dim=-1))
    return m.eval()


def test_the_denoiser_runs_the_core_once_per_training_step():
    m = _denoiser().train()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(11, (3, 7), generator=g)
    core, prelude = [], []
    hooks = _count(m.core, core) + _count(m.prelude, prelude)
    m.loss(tokens, torch.rand(3, 7, generator=g) + 0.1, torch.randn(3, 7, 16, generator=g)).sum().backward()
    for h in hooks:
        h.remove()
    assert [n for n, _ in core] == [14, 14] and [n for n, _ in prelude] == [7]  # each core layer once, on [noisy ; clean]


def test_the_denoiser_is_causal_and_its_cache_equals_the_training_forward():
    m = _denoiser()
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(11, (2, 8), generator=g)
    z, sigma = torch.randn(2, 8, 16, generator=g), torch.rand(2, 8, generator=g) + 0.05
    later = tokens.clone()
    later[:, 5:] = (later[:, 5:] + 3) % 11
    with torch.no_grad():
        D, logits = m.denoise(z, sigma, tokens)
        assert torch.allclose(logits[:, :6], m.denoise(z, sigma, later)[1][:, :6], atol=1e-6)
        assert not torch.allclose(logits[:, 6:], m.denoise(z, sigma, later)[1][:, 6:])
        cache = KVCache(len(m.trunk.layers))
        m.trunk.extend(cache, tokens[:, :3])
        for i in range(3, 8):
            Dn, ln = m.denoise_next(z[:, i], sigma[:, i], cache)
            assert torch.allclose(ln, logits[:, i], atol=1e-5) and torch.allclose(Dn, D[:, i], atol=1e-5)
            m.trunk.extend(cache, tokens[:, i:i + 1])
        Dc, lc = m.denoise_cached(z.repeat(2, 1, 1), sigma.repeat(2, 1), m.clean_cache(tokens))  # the chains' way
        assert torch.allclose(lc, logits.repeat(2, 1, 1), atol=1e-5)
        assert torch.allclose(Dc, D.repeat(2, 1, 1), atol=1e-5)


def test_inference_runs_the_core_k_times_and_the_prelude_once_per_token():
    from diffusionblocks.blocks import BlockwiseDenoiser
    from diffusionblocks.tasks import apply_overrides, default_config, get_task
    from diffusionblocks.token_chain import generate_chain

    Chain = BlockwiseDenoiser([_denoiser()], get_task("arlm").partition(apply_overrides(default_config("arlm"),
                                                                             ["blocks.num_blocks=1", "model.depth=1"])))
    prompts = torch.randint(11, (2, 4), generator=torch.Generator().manual_seed(5))
    for K in (1, 3, 8):
        core, prelude = [], []
        hooks = _count(Chain.blocks[0].core[:1], core) + _count(Chain.blocks[0].prelude, prelude)
        out = generate_chain(Chain, prompts, 5, window=32, steps=K, seeds=[0, 1])
        for h in hooks:
            h.remove()
        assert out.shape == (2, 9)
        assert len(core) == 5 * K and all(n == 1 for n, _ in core)  # K core passes of the one new position per token
        assert sum(n for n, _ in prelude) == 4 + 5  # every token through the prelude once (the prompt at once)
        fast = generate_chain(Chain, prompts, 5, window=32, steps=K, seeds=[0, 1], cache=False)
        assert torch.equal(out, fast)


TINY = ["model.hidden_size=16", "model.num_heads=2", "model.seq_len=12", "model.mean_recurrence=2", "model.bptt=1",
        "train.batch_size=4", "train.steps_per_block=3", "train.log_every=1", "train.lr_warmup_steps=1",
        "sample.num=1", "sample.new_chars=4", "sample.prompt_chars=4"]


def test_both_models_train_sample_and_evaluate_through_the_cli(tmp_path, capsys):
    import json

    import pytest

    from diffusionblocks.cli import main
    from diffusionblocks.config import ConfigError
    from diffusionblocks.pretrained import from_pretrained
    from diffusionblocks.tasks import apply_overrides, default_config, get_task
    from diffusionblocks.tasks.recurrent_depth import likelihood_after
    from diffusionblocks.text import shared_windows

    judge = tmp_path / "judge"
    assert main(["train", "--task", "arlm", "--out", str(judge), "--no-progress", "blocks.num_blocks=1",
                 "model.mode=plain", "model.hidden_size=16", "model.num_heads=2", "model.depth=1",
                 "model.seq_len=12", "train.steps_per_block=2", "train.batch_size=4", "sample.num=1",
                 "sample.new_chars=2", "sample.prompt_chars=4"]) == 0
    for mode in ("diffusion", "huginn"):
        run = tmp_path / mode
        assert main(["train", "--task", "recurrent", "--out", str(run), "--no-progress", f"model.mode={mode}",
                     *TINY]) == 0
        assert (run / "samples.txt").is_file()
        ev = tmp_path / f"ev-{mode}"
        assert main(["evaluate", str(run), "--iterations", "1,3", "--judge", str(judge), "--prompts", "2", "--new",
                     "3", "--windows", "4", "--mauve-prompts", "20", "--mauve-new", "8", "--mauve-iterations", "3,16",
                     "--out", str(ev), "--no-progress"]) == 0
        result = json.loads((ev / "evaluation.json").read_text())
        rows = result["by_iterations"]
        assert [r["iterations"] for r in rows] == [1, 3] and all(r["gen_ppl"] > 1 for r in rows)
        # MAUVE at the K's of --iterations that --mauve-iterations names (3, not 16), the bounds once per run.
        assert "mauve" not in rows[0] and rows[1]["mauve"]["num_p"] == rows[1]["mauve"]["num_q"] == 20
        assert result["mauve_iterations"] == [3] and result["judge"]["run"] == str(judge)
        assert result["judge"]["bounds"]["ceiling"]["num_p"] == 20
        # Every K on the same 4 windows spread over the held-out split, with the model's own estimator.
        model, cfg = from_pretrained(run)
        windows = shared_windows(get_task("recurrent").load_run_data(cfg, run).test, cfg.model.seq_len, 4)
        for r in rows:
            want = likelihood_after(model, cfg, windows, r["iterations"], huginn_draws=8,
                                    **get_task("recurrent").evaluate_options().chain_kwargs(1.0))
            assert r["bpc"] == pytest.approx(want["bits"], abs=1e-6) and r["bpc_se"] == pytest.approx(want["se"])
            assert r["likelihood"]["num_windows"] == 4 and r["bpc_bias"] >= 0
        out = tmp_path / f"{mode}.txt"
        assert main(["sample", str(run), "--num", "2", "--prompt", "ROMEO", "--new", "3", "--iterations", "2",
                     "--out", str(out), "--no-progress"]) == 0
        assert out.read_text().startswith("ROMEO")
    with pytest.raises(ConfigError, match="blocks.num_blocks must be 1"):
        apply_overrides(default_config("recurrent"), ["blocks.num_blocks=2"])
    with pytest.raises(ConfigError, match="model.prelude \\+ model.core \\+ model.coda"):
        apply_overrides(default_config("recurrent"), ["model.core=3"])
