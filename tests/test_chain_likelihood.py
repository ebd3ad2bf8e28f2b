"""The chain's own next-token likelihood (chain_likelihood.chain_likelihood) against a chain whose blocks are exact
posteriors: a bigram source over a few tokens with fixed embeddings, each block's logits at noise sigma
log p(x | previous token) - |z - E[x]|^2 / (2 sigma^2), its D the posterior mean, routed by the real partition,
sampler and bridge. Drawing each step's token from the exact posterior and moving on by Euler's step keeps the
forward process's joint law of (token, noisy state) from one grid point to the next, so the chain's next-token
distribution is p(x | previous token), up to its start z0 = sigma_max eps instead of E[x] + sigma_max eps (a KL of
|E[x]|^2 / (2 sigma_max^2) = 2e-5 nats here)."""

import math

import pytest
import torch
from torch import nn

import diffusionblocks.chain_likelihood as cl
from diffusionblocks.blocks import BlockwiseDenoiser
from diffusionblocks.config import ConfigError
from diffusionblocks.models.arlm import ARDenoiser
from diffusionblocks.sampling import euler_step
from diffusionblocks.seeding import make_generator
from diffusionblocks.tasks import apply_overrides, default_config, get_task
from diffusionblocks.text import TokenStream, shared_windows
from diffusionblocks.token_chain import chain_grid

V = 6


class ExactPosterior(nn.Module):
    """The exact denoiser of a bigram source (the first token uniform); records the sigmas it is called at."""

    def __init__(self, E: torch.Tensor, log_p: torch.Tensor):
        super().__init__()
        self.register_buffer("E", E)
        self.register_buffer("log_p", log_p)  # (V, V): row = the previous token
        self.sigmas: list[torch.Tensor] = []

    def denoise(self, z: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor):
        N, L = tokens.shape
        prior = torch.cat([torch.full((N, 1, V), -math.log(V), dtype=torch.float64), self.log_p[tokens[:, :-1]]], 1)
        distance2 = ((z.double()[..., None, :] - self.E) ** 2).sum(-1)  # (N, L, V)
        logits = prior - distance2 / (2 * sigma.double()[..., None] ** 2)
        self.sigmas.append(sigma.flatten())
        return logits.softmax(-1) @ self.E, logits

    def clean_cache(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens  # the context is the table's row: nothing to run once

    def denoise_cached(self, z: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor):
        return self.denoise(z, sigma, tokens.repeat(len(z) // len(tokens), 1))  # row r reads clean row r mod n

    estimate = ARDenoiser.estimate  # the bridges as the real blocks hand them on


def _source(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (orthogonal rows of norm 0.5: posteriors stay soft at sigma 0.3) and a peaked bigram table."""
    g = torch.Generator().manual_seed(seed)
    E = 0.5 * torch.linalg.qr(torch.randn(V, V, generator=g, dtype=torch.float64))[0]
    return E, (2.0 * torch.randn(V, V, generator=g)).log_softmax(-1).double()


def _chain(B: int, tables: list[torch.Tensor], E: torch.Tensor) -> BlockwiseDenoiser:
    """B exact-posterior blocks (block b of bigram table tables[b]) on the arlm partition, the noise axis cut at 0.3."""
    cfg = apply_overrides(default_config("arlm"), [f"blocks.num_blocks={B}", "noise.sigma_min=0.3"])
    return BlockwiseDenoiser([ExactPosterior(E, t) for t in tables], get_task("arlm").partition(cfg))


def _windows(log_p: torch.Tensor, n: int, L: int, seed: int = 1) -> torch.Tensor:
    """n windows of L tokens drawn from the source."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, L, dtype=torch.long)
    x[:, 0] = torch.randint(V, (n,), generator=g)
    for j in range(1, L):
        x[:, j] = torch.multinomial(log_p[x[:, j - 1]].exp(), 1, generator=g)[:, 0]
    return x


def _true_bits(log_p: torch.Tensor, x: torch.Tensor) -> float:
    return float(-log_p[x[:, :-1], x[:, 1:]].mean() / math.log(2))


def test_the_token_enumeration_is_unbiased():
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(3, 4, V, generator=g).double().softmax(-1)
    target = torch.randint(V, (3, 4), generator=g)
    f = torch.randn(V, generator=g).double()  # any function of the first token
    tokens, weights = cl.token_enumeration(p0, target, 2, g)
    assert tokens.shape == weights.shape == (4, 3, 4)
    assert torch.allclose(weights.sum(0), torch.ones(3, 4, dtype=torch.float64))
    assert torch.equal(tokens[2], target)  # the scored token is always enumerated
    mean = sum((w * f[t]).sum(0) for t, w in (cl.token_enumeration(p0, target, 2, g) for _ in range(3000))) / 3000
    assert torch.allclose(mean, p0 @ f, atol=0.02)
    tokens, weights = cl.token_enumeration(p0, target, V, g)  # every token enumerated: no tail left
    assert torch.allclose(weights[-1], torch.zeros(3, 4, dtype=torch.float64))


def _no_tail(p0, target, top_k, g):
    tokens, weights = FIRST(p0, target, top_k, g)
    return tokens, torch.cat([weights[:-1], torch.zeros_like(weights[-1:])])


def _uniform_weights(p0, target, top_k, g):
    tokens, weights = FIRST(p0, target, top_k, g)
    return tokens, torch.full_like(weights, 1 / len(weights))


def _scored_against_the_previous_token(probs, x):  # the plain LM's alignment (position j predicts token j + 1)
    return probs[..., 1:, :].gather(-1, x[..., :-1, None])[..., 0]


FIRST = cl.token_enumeration
MISTAKES = {"token_enumeration": {"no tail": _no_tail, "uniform weights": _uniform_weights},
            "scored": {"off by one": _scored_against_the_previous_token}}


@pytest.mark.parametrize("mistake", [None, "no tail", "uniform weights", "off by one"])
def test_the_chain_likelihood_of_exact_posteriors_is_the_true_conditional(mistake, monkeypatch):
    """Right: the bias-corrected bits within 4 standard errors of the estimator (its draws) of the true
    cross-entropy; each deliberate mistake, put into the estimator, lands outside."""
    for name, mistakes in MISTAKES.items():
        if mistake in mistakes:
            monkeypatch.setattr(cl, name, mistakes[mistake])
    E, log_p = _source()
    model = _chain(2, [log_p, log_p], E)  # two steps: after the enumerated first draw, only the start noise is drawn
    x = _windows(log_p, 32, 16)
    r = cl.chain_likelihood(model, x, draws=32, top_k=2, seed=1)
    tight = r["se_estimator"] < 0.02 and 0 < r["bias"] < 0.05  # the tolerance stays small
    close = abs(r["bits"] - r["bias"] - _true_bits(log_p, x)) < 4 * r["se_estimator"]
    assert (tight and close) == (mistake is None), (r["bits"], r["bias"], r["se_estimator"], _true_bits(log_p, x))


def test_three_blocks_route_each_step_and_keep_the_true_conditional():
    """B=3: both token draws a later step reads enumerated; each step's block is the one the partition gives its
    sigma."""
    E, log_p = _source()
    model = _chain(3, [log_p] * 3, E)
    x = _windows(log_p, 32, 16)
    r = cl.chain_likelihood(model, x, draws=32, top_k=2, seed=2)
    assert abs(r["bits"] - r["bias"] - _true_bits(log_p, x)) < 4 * r["se_estimator"]
    for b, block in enumerate(model.blocks):
        sigmas = torch.cat(block.sigmas)
        assert len(sigmas) and bool((model.partition.owner(sigmas) == b).all())


def test_block_zero_alone_is_not_the_chain():
    """Block 0 exact, the later blocks the posteriors of another source: next_token_bits (block 0 at sigma_max) is
    the true conditional, the chain's likelihood is not; with all blocks exact the two agree."""
    E, log_p = _source()
    _, other = _source(seed=5)
    x = _windows(log_p, 32, 16)
    truth = _true_bits(log_p, x)
    wrong = _chain(2, [log_p, other], E)
    assert abs(cl.next_token_bits(wrong, x) - truth) < 0.01  # sigma_max's likelihood term is almost flat
    r = cl.chain_likelihood(wrong, x, draws=16, top_k=2)
    assert r["bits"] - r["bias"] - truth > 10 * r["se_estimator"]
    right = cl.chain_likelihood(_chain(2, [log_p, log_p], E), x, draws=16, top_k=2)
    assert abs(right["bits"] - right["bias"] - cl.next_token_bits(wrong, x)) < 4 * right["se_estimator"] + 0.01


def _exhaustive(model, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The chain's q(x_j | x_<j) for each start noise eps (draws, n, L, D), by hand: Euler down the quantile grid of
    B=3 steps, summed over both read token draws (y0, y1), the same token at every position (positions are
    independent), each path weighted by p0(y0) p1(y1); (draws, n, L - 1)."""
    sigmas = chain_grid(model, None, "quantile").double()
    f = torch.zeros(len(eps), *x.shape, dtype=torch.float64)
    for y0 in range(V):
        for y1 in range(V):
            z, weight = sigmas[0] * eps.double().flatten(0, 1), 1.0
            xs = x.repeat(len(eps), 1)
            for k, y in enumerate((y0, y1, None)):
                block = model.blocks[int(model.partition.owner(sigmas[k:k + 1].float())[0])]
                D, logits = block.denoise(z, sigmas[k].expand(xs.shape), xs)
                p = logits.softmax(-1)
                if y is None:
                    f += (weight * p.gather(-1, xs[..., None])[..., 0]).view(f.shape)
                    break
                weight = weight * p[..., y]
                z = euler_step(z, block.estimate(D, logits, "sample", torch.full_like(xs, y)), sigmas[k], sigmas[k + 1])
    return f[..., 1:]


def test_the_enumeration_tree_is_the_sum_over_every_token_the_chain_draws():
    """B=3, every token of both read draws enumerated (top_k = later_k = V: the tails weigh 0): each draw's estimate
    is, for its start noise, the exhaustive sum over the chain's tokens (a wrong branch order or weight fails)."""
    E, log_p = _source()
    model = _chain(3, [log_p, log_p.flip(0), log_p.flip(1)], E)  # different blocks: a mix-up shows
    x = _windows(log_p, 3, 5)
    sigmas = chain_grid(model, None, "quantile")
    f = cl._chain_draws(model, x, 2, 0, sigmas=sigmas, bridge="sample", sampler="euler", ranks=[V + 2, V + 2],
                        seed=0, batch_size=2 * 64 * 3, num_tokens=None)  # one batch: one generator
    eps = torch.randn(2, 3, 5, V, generator=make_generator(0, "arlm-chain-likelihood", 0))  # its first draw
    assert torch.allclose(f, _exhaustive(model, x, eps), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("steer, line", [(0.5, 0.0), (0.2, 0.5), (0.0, 0.6)])
def test_steered_start_noises_are_weighted_back_to_the_standard_normal(steer, line):
    """E_mixture[w h(eps)] = E_N(0, I)[h(eps)] for h = 1, eps and eps^2 at every position, the weights at most
    1 / (1 - steer - line), and the steering visible where unweighted (the mean moves toward the scored token); with
    the step shifts alone, with both kinds, and with the line shifts alone."""
    E, log_p = _source()
    E = 4 * E  # shifts of about one standard deviation: a weight off by exp(|mu|^2 / 2) shows
    model, x = _chain(3, [log_p] * 3, E), _windows(log_p, 2, 4)
    eps, w = cl.steered_noise(model, x, chain_grid(model, None, "quantile"), 40000, torch.Generator().manual_seed(0),
                              steer, None, line)
    eps, w = eps.double(), w[..., None]
    assert float(w.max()) <= 1 / (1 - steer - line) + 1e-9
    assert torch.allclose(w.mean(0), torch.ones(2, 4, 1, dtype=torch.float64), atol=0.03)
    assert torch.allclose((w * eps).mean(0), torch.zeros(2, 4, V, dtype=torch.float64), atol=0.03)
    assert torch.allclose((w * eps ** 2).mean(0), torch.ones(2, 4, V, dtype=torch.float64), atol=0.05)
    toward = torch.einsum("nld,nld->nl", eps.mean(0), E[x].double())  # unweighted: along the scored embedding
    assert float(toward.min()) > 0.1


def test_the_samplers_evaluations_are_counted():
    sigmas = torch.tensor([80.0, 5.0, 1.0, 0.0])
    assert [cl.evaluation_count(s, sigmas) for s in ("euler", "heun", "dpmpp_2m")] == [3, 5, 3]


def test_the_tree_enumerates_the_draws_nearest_the_readout_within_its_budget():
    E, log_p = _source()
    x = _windows(log_p, 4, 6)
    r = cl.chain_likelihood(_chain(1, [log_p], E), x, steps=6, draws=2, top_k=2, max_enumerated=16)
    assert r["enumerated"] == 16 and r["drawn_later"] == 2  # 4 x 2 x 2: of the four later read draws, the last two
    r = cl.chain_likelihood(_chain(1, [log_p], E), x, steps=6, draws=2, top_k=2, later_k=None)
    assert r["enumerated"] == 4 and r["drawn_later"] == 4


def test_the_draws_double_until_the_fall_is_within_the_tolerance():
    E, log_p = _source()
    model, x = _chain(3, [log_p] * 3, E), _windows(log_p, 8, 8)
    fixed = cl.chain_likelihood(model, x, draws=2, top_k=2)
    grown = cl.chain_likelihood(model, x, draws=2, top_k=2, tolerance=1e-9, max_draws=8)
    assert fixed["draws"] == 2 and grown["draws"] == 8 and grown["tolerance"] == 1e-9
    loose = cl.chain_likelihood(model, x, draws=2, top_k=2, tolerance=10.0, max_draws=8)
    assert loose["draws"] == 2 and loose["bits"] == fixed["bits"]  # the first draws are the fixed run's
    with pytest.raises(ConfigError, match="max_draws >= draws"):
        cl.chain_likelihood(model, x, draws=4, max_draws=2)


def test_deterministic_bridges_need_no_enumeration_and_the_errors_add_up():
    E, log_p = _source()
    x = _windows(log_p, 16, 8)
    r = cl.chain_likelihood(_chain(2, [log_p, log_p], E), x, bridge="softmax", draws=4)
    assert r["top_k"] is None and len(r["per_window"]) == 16 == r["num_windows"]
    assert r["bits"] == pytest.approx(sum(r["per_window"]) / 16, abs=1e-4)
    assert r["se"] == pytest.approx(torch.tensor(r["per_window"]).std().item() / 4, rel=1e-3)
    with pytest.raises(Exception, match="at least 2 draws"):
        cl.chain_likelihood(_chain(2, [log_p, log_p], E), x, draws=1)


def test_shared_windows_spread_over_the_split():
    stream = TokenStream(torch.arange(1000), None, "test")
    w = shared_windows(stream, 10, num=7)
    starts = w[:, 0].tolist()
    assert w.shape == (7, 10) and starts[0] == 0 and starts[-1] == 990 and len(set(starts)) == 7
    assert all(s % 10 == 0 for s in starts) and max(b - a for a, b in zip(starts, starts[1:])) <= 170
    assert shared_windows(stream, 10, num=500).shape == (100, 10)  # fewer windows than asked: all of them


@pytest.mark.parametrize("K", [2, 4])
def test_the_recurrent_denoiser_after_k_steps_keeps_the_true_conditional(K):
    """The recurrent task's denoiser is one block run for K sampler steps: its likelihood (likelihood_after, the
    run's sampler and bridge) is the true conditional at every K, each of its K - 1 read token draws enumerated."""
    from diffusionblocks.tasks.recurrent_depth import likelihood_after

    E, log_p = _source()
    model = _chain(1, [log_p], E)
    x = _windows(log_p, 32, 16)
    r = likelihood_after(model, default_config("recurrent"), x, K, draws=32, top_k=2, seed=3)
    assert r["steps"] == K and r["bridge"] == "sample"
    assert abs(r["bits"] - r["bias"] - _true_bits(log_p, x)) < 4 * r["se_estimator"]


def test_huginn_likelihood_of_a_bigram_model_is_its_cross_entropy():
    """A Huginn model whose logits at position j are log p(. | token j), whatever its state: the mean of its softmax
    over draws is p, so its bits are the bigram cross-entropy of token j + 1, exactly, with no spread."""
    from diffusionblocks.models.recurrent import HuginnLM
    from diffusionblocks.tasks.recurrent_depth import huginn_likelihood

    _, log_p = _source()

    class Bigram(HuginnLM):
        def forward(self, tokens, iterations, state):
            return log_p[tokens].float() + 0 * state[..., :1]

    class Run:
        blocks = [Bigram(V, hidden_size=8, num_heads=2, prelude=1, core=1, coda=1)]

    x = _windows(log_p, 8, 10)
    r = huginn_likelihood(Run, x, 3, draws=4, batch_size=8)
    assert r["bits"] == pytest.approx(_true_bits(log_p, x), abs=1e-5)
    assert r["bias"] == pytest.approx(0, abs=1e-9) and r["se_estimator"] == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("spread, low, high", [(0.3, 0.8, 1.2), (0.8, 0.5, 1.0), (1.5, 0.3, 0.5)])
def test_the_tallys_bias_matches_the_log_of_a_mean_of_draws(spread, low, high):
    """Draws f = q exp(s eps - s^2 / 2) (unbiased for q): the tally's estimated bias, over many tokens, against the
    realised bias -log2 mean(f) + log2 q: within 20% for moderate spreads; for heavy-tailed draws the second-order
    estimate falls short (there the corrected bits are still above -log2 q), and the fall from half the draws is
    nearer the realised bias than the delta method (about the bias itself for moderate spreads)."""
    g = torch.Generator().manual_seed(0)
    M, n, T = 4, 64, 256
    q = torch.rand(n, T, generator=g, dtype=torch.float64) * 0.9 + 0.05
    f = q * torch.exp(spread * torch.randn(M, n, T, generator=g, dtype=torch.float64) - spread ** 2 / 2)
    tally = cl.LikelihoodTally()
    tally.add(f)
    r = tally.result()
    truth = float(-torch.log2(q).mean())
    true_bias = float((-torch.log2(f.mean(0)) + torch.log2(q)).mean())  # the realised bias on these draws
    assert true_bias > 0.01
    assert low * true_bias < r["bias"] < high * true_bias
    assert r["bits"] == pytest.approx(truth + true_bias)  # the realised bias is the figure's whole error here
    assert r["bias"] < r["fall"] < 1.25 * true_bias and (spread > 0.5 or r["fall"] > 0.8 * true_bias)


def test_a_draw_that_carries_all_of_q_keeps_the_bias_bounded():
    """One draw finds the token, the others miss it (f = 0): q's estimate is still positive, and the bias stays below
    1 / (2 ln 2) bits, where a jackknife's leave-one-out mean of 0 would give -log2 0."""
    f = torch.zeros(4, 1, 3, dtype=torch.float64)
    f[0] = 0.8
    tally = cl.LikelihoodTally()
    tally.add(f)
    r = tally.result()
    assert r["bits"] == pytest.approx(-math.log2(0.2))
    assert 0 < r["bias"] <= 1 / (2 * math.log(2)) + 1e-12
    assert math.isfinite(r["se_estimator"]) and r["se_estimator"] > 0


def test_more_steps_than_blocks_on_the_block_grid_route_each_step_to_its_owner_and_keep_the_conditional():
    """B=3, 6 steps on the per-block grid: two steps inside each block's range (none on an inner boundary or at
    sigma_min), each evaluated by the block that owns its sigma, and the chain's next-token distribution still the
    true conditional."""
    E, log_p = _source()
    model = _chain(3, [log_p] * 3, E)
    sigmas = chain_grid(model, 6, "blocks")[:-1]
    inner = model.partition.boundaries[1:-1]
    assert not any(torch.isclose(sigmas, s).any() for s in inner) and float(sigmas.min()) > model.partition.axis.lo
    x = _windows(log_p, 32, 16)
    r = cl.chain_likelihood(model, x, steps=6, grid="blocks", draws=32, top_k=2, seed=3)
    assert abs(r["bits"] - r["bias"] - _true_bits(log_p, x)) < 4 * r["se_estimator"]
    for b, block in enumerate(model.blocks):
        seen = torch.cat(block.sigmas).float().unique()
        assert bool((model.partition.owner(seen) == b).all())
        assert torch.allclose(seen, sigmas[model.partition.owner(sigmas) == b].float().unique())
        assert len(seen) == 2


def test_the_block_grid_needs_a_multiple_of_the_blocks():
    with pytest.raises(ConfigError, match="not a multiple of 3"):
        chain_grid(_chain(3, [_source()[1]] * 3, _source()[0]), 4, "blocks")
    with pytest.raises(ConfigError, match="not a multiple of blocks.num_blocks=3"):
        apply_overrides(default_config("arlm"), ["sample.grid=blocks", "sample.steps=4"])


def _steered_paths(steer: float, rows: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Paths of three drawn levels with fixed distributions p_k (one row of logits repeated, two positions), the
    scored token x = 0 at each: the tokens (3, rows, 2), the paths' weights (rows, 2) and the p_k (V,) at position 0."""
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, V, generator=g).double() * 1.5 for _ in range(3)]
    x = torch.zeros(rows, 2, dtype=torch.long)
    draws = cl.SteeredDraws([1, 2, 3], steer, g)
    tokens, w = [], torch.ones(rows, 2, dtype=torch.float64)
    for e, l in zip([1, 2, 3], logits):
        y, wk = draws.draw(e, l.expand(rows, 2, V), x)
        tokens.append(y[0])
        w = w * wk[0]
    return torch.stack(tokens), w, [l[0].softmax(-1) for l in logits]


STEERED_DRAW = cl.SteeredDraws.draw


def _unweighted(self, e, logits, x):  # a wrong weight: none
    return STEERED_DRAW(self, e, logits, x)[0], torch.ones(1, *x.shape, dtype=torch.float64)


def _single_levels_only(self, e, logits, x):  # a wrong weight: the density of the single-level components alone
    y, w = STEERED_DRAW(self, e, logits, x)
    if e == self.levels[-1]:
        at = torch.logsumexp(torch.stack(self.log_r), 0).exp()
        w = (1 / ((1 - self.steer) + self.steer / len(self.levels) * at))[None]
    return y, w


@pytest.mark.parametrize("mistake", [None, "unweighted", "single levels only"])
def test_steered_draws_are_weighted_back_to_the_blocks_own_draws(mistake, monkeypatch):
    """E_mixture[w h(path)] = E_p[h(path)] for h(y1, y2, y3) = f1(y1) f2(y2) + f3(y3) with independent levels, the
    weights at most 1 / (1 - steer), and the scored token visible where unweighted; each wrong weight fails."""
    if mistake is not None:
        monkeypatch.setattr(cl.SteeredDraws, "draw", {"unweighted": _unweighted,
                                                      "single levels only": _single_levels_only}[mistake])
    g = torch.Generator().manual_seed(1)
    f = torch.randn(3, V, generator=g).double()
    tokens, w, p = _steered_paths(0.5, 200000)
    h = f[0][tokens[0]] * f[1][tokens[1]] + f[2][tokens[2]]
    want = float((p[0] @ f[0]) * (p[1] @ f[1]) + p[2] @ f[2])
    right = abs(float((w * h)[:, 0].mean()) - want) < 0.02
    assert right == (mistake is None), (float((w * h)[:, 0].mean()), want)
    if mistake is None:
        assert float(w.max()) <= 2 + 1e-9
        # level k takes x on its own draws and where the mixture forces it: steer / (2 m) (1 + k + 1) of the chains
        taken = [float((tokens[k][:, 0] == 0).double().mean()) for k in range(3)]
        assert all(abs(taken[k] - (p[k][0] + (1 - p[k][0]) * (k + 2) / 12)) < 0.005 for k in range(3))


def test_many_steps_with_later_draws_drawn_and_steered_keep_the_true_conditional():
    """B=1 run for 8 steps, the first draw enumerated and the six later ones drawn, 0.8 of the chains steered: the
    true conditional (unweighted, the steering lands 0.3 bits low, outside)."""
    E, log_p = _source()
    model = _chain(1, [log_p], E)
    x = _windows(log_p, 32, 16)
    r = cl.chain_likelihood(model, x, steps=8, draws=32, top_k=2, later_k=None, seed=4)
    assert r["drawn_later"] == 6 and r["draw_steer"] == 0.8 and "line_steer" not in r
    assert abs(r["bits"] - r["bias"] - _true_bits(log_p, x)) < 4 * r["se_estimator"]
    r = cl.chain_likelihood(model, x, steps=8, draws=32, top_k=2, later_k=None, seed=4, line_steer=0.5)
    assert r["line_steer"] == 0.5  # the recurrent denoiser's default: half the start noises along the line
    assert abs(r["bits"] - r["bias"] - _true_bits(log_p, x)) < 4 * r["se_estimator"]
