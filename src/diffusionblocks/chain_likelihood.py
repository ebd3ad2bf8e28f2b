"""The next-token likelihood of held-out text under a chain of token denoisers: block 0's own at sigma_max, and the
chain's own (every block, the sampler's steps and bridge), whose token draws are enumerated and whose start noises
and drawn levels are steered toward the scored token and weighted back; LikelihoodTally gives the estimate's
standard error and its upward bias (benchmarks/results/chain-likelihood-draws).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .blocks import BridgedDenoiser
from .config import ConfigError
from .models.arlm import KVCache
from .sampling import SAMPLERS
from .seeding import make_generator
from .text import usable_logits
from .token_chain import at_each_position, chain_grid, draw_token, is_plain

# How far a steered start noise moves the second step's state from a drawn token's embedding toward the scored
# one's (steered_noise): near where the block's decision turns, measured best on tinyshakespeare (0.25-0.4).
REACH = 0.3
# The line shifts of a steered start noise (steered_noise's `line` share): LINE_SHIFTS magnitudes spaced evenly up to
# LINE_REACH standard deviations along the scored token's line (tinyshakespeare's recurrent denoiser: 3 did best of
# 2, 3, 4 and 6; benchmarks/results/chain-likelihood-draws).
LINE_REACH, LINE_SHIFTS = 3.0, 12


@torch.no_grad()
def next_token_bits(model, windows: torch.Tensor, *, seed: int = 0, batch_size: int = 64) -> float:
    """Held-out bits per character of each window's characters 1..L-1 given those before: the baseline's logits,
    or block 0's at sigma_max (its noisy input is almost pure noise: a predictive distribution from context)."""
    return next_token_likelihood(model, windows, seed=seed, batch_size=batch_size)["bits"]


@torch.no_grad()
def next_token_likelihood(model, windows: torch.Tensor, *, seed: int = 0, batch_size: int = 64) -> dict[str, Any]:
    """next_token_bits with its standard error over the windows (LikelihoodTally's result; one draw: no bias or
    estimator's error given). For a chain: block 0 alone at sigma_max (L/B layers), one noise draw."""
    tally = LikelihoodTally()
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size]
        if is_plain(model):
            logits = model.blocks[0](x)[:, :-1]  # position j's: the distribution of token j + 1
        else:
            blk = model.blocks[0]
            sigma = torch.full(x.shape, float(model.partition.axis.hi), device=x.device)
            eps = torch.randn(*x.shape, blk.E.shape[1], generator=make_generator(seed, "arlm-bpc", i)).to(x.device)
            logits = blk.denoise(eps * sigma[..., None], sigma, x)[1][:, 1:]  # position j's: token j's
        tally.add(logits.double().log_softmax(-1).gather(-1, x[:, 1:, None])[None, ..., 0].exp())
    return tally.result()


def _denoise_each(block, z: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's (D, logits) on z at one sigma (N,) per sequence of tokens (N, L)."""
    return block.denoise(z, at_each_position(sigma, tokens), tokens)


class LikelihoodTally:
    """Running sums of a next-token likelihood estimate over windows. add(f) takes f (draws, n, T): each of `draws`
    independent unbiased estimates of q(x_j | x_<j), the probability the model gives each scored token, for n
    windows of T scored positions. q is estimated by their mean, whose -log2 is biased up (Jensen): to second order
    (the delta method) by Var(f) / (2 draws q^2 ln 2) bits, the estimator's variance Var(f) / (draws q^2 ln(2)^2).
    Both are bounded where one draw carries all of q (the sample variance of `draws` values is at most draws q^2:
    the bias at most 1 / (2 ln 2) bits a token), unlike a jackknife, whose leave-one-out means can be 0. Where the
    draws are heavy-tailed (a rare draw carries most of q) the delta method falls short; the `fall`, the same
    estimate from each half of the draws minus the one from all, measures the bias that doubling the draws removed:
    the bias left is about the fall where it shrinks as 1 / draws, more where it shrinks more slowly."""

    def __init__(self):
        self.window_bits: list[torch.Tensor] = []  # per window: its mean bits per scored token
        self.bias, self.mc_var, self.fall, self.count = 0.0, 0.0, 0.0, 0

    def add(self, f: torch.Tensor) -> None:
        f = f.double()
        M = f.shape[0]
        q = f.mean(0).clamp_min(torch.finfo(torch.float64).tiny)  # (n, T)
        self.window_bits.append((-torch.log2(q)).mean(-1).cpu())
        if M > 1:
            rel = f.var(0) / (M * q ** 2)  # (n, T): the variance of q's estimate relative to q^2, at most 1
            self.bias += float(rel.sum()) / (2 * math.log(2))
            self.mc_var += float(rel.sum()) / math.log(2) ** 2
            h = M // 2
            halves = torch.stack([f[:h].mean(0), f[h:2 * h].mean(0)]).clamp_min(torch.finfo(torch.float64).tiny)
            self.fall += float((-torch.log2(halves)).mean(0).sum() + torch.log2(q).sum())
        self.count += f[0].numel()

    def result(self, scale: float = 1.0) -> dict[str, Any]:
        """bits per token (divided by `scale`, e.g. characters per token), its standard error over the windows
        (the text's spread and the estimator's draws together), the estimator's own standard error (what remains
        on a fixed set of windows), its estimated upward bias (0 for an exact likelihood) and the fall from half
        the draws."""
        per_window = torch.cat(self.window_bits)
        W = len(per_window)
        se = float(per_window.std() / math.sqrt(W)) if W > 1 else float("nan")
        return {"bits": float(per_window.mean()) / scale, "se": se / scale,
                "se_estimator": math.sqrt(self.mc_var) / self.count / scale, "bias": self.bias / self.count / scale,
                "fall": self.fall / self.count / scale,
                "num_windows": W, "per_window": [round(float(b) / scale, 5) for b in per_window]}


def token_enumeration(p: torch.Tensor, target: torch.Tensor, top_k: int,
                      g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A token draw y ~ p (N, L, V) Rao-Blackwellised for scoring target (N, L): the top_k tokens of p and the
    target, each weighted by its probability (the target's 0 when it is among the top_k), and one token drawn from
    the rest of p weighted by the rest's mass, so that sum_r w_r f(y_r) is unbiased for E_y[f(y)] (top_k = 0: the
    target and one draw from the rest). Returns tokens and weights, (top_k + 2, N, L) each."""
    V = p.shape[-1]
    top_w, top = p.topk(min(top_k, V), dim=-1)  # (N, L, k)
    target_w = p.gather(-1, target[..., None])[..., 0] * ~(top == target[..., None]).any(-1)
    rest = p.scatter(-1, top, 0.0).scatter(-1, target[..., None], 0.0)
    mass = rest.sum(-1)  # (N, L)
    u = torch.rand(mass.shape, generator=g, dtype=torch.float64).to(p.device)
    tail = ((rest.cumsum(-1) / mass[..., None].clamp_min(1e-300)) < u[..., None]).sum(-1).clamp_max(V - 1)
    tokens = torch.cat([top.movedim(-1, 0), target[None], tail[None]])  # (k + 2, N, L)
    weights = torch.cat([top_w.movedim(-1, 0), target_w[None], mass[None]])
    return tokens, weights


def evaluation_count(sampler: str, sigmas: torch.Tensor) -> int:
    """How many denoiser evaluations `sampler` makes down sigmas (counted on a dry run of a zero denoiser)."""
    calls = []

    def zero(x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
        calls.append(sigma)
        return torch.zeros_like(x)

    SAMPLERS[sampler](zero, torch.ones(1, 1), sigmas.cpu(), disable=True)
    return len(calls)


class EnumerationTree:
    """Chains as rows (draws, R_0, ..., R_{m-1}, n): level e's R_e branches are the enumerated tokens of the draw
    after evaluation e, so rows that differ only at levels >= e are one chain up to evaluation e (computed once,
    `shared`, then `spread` back)."""

    def __init__(self, draws: int, ranks: list[int], n: int):
        self.draws, self.ranks, self.n = draws, ranks, n

    def shared(self, t: torch.Tensor, e: int) -> torch.Tensor:
        """Rows (draws * R_0 ... R_{m-1} * n, ...) -> the distinct chains before level e's draw, (draws * R_0 ...
        R_{e-1} * n, ...)."""
        if e >= len(self.ranks):
            return t
        v = t.view(self.draws, *self.ranks, self.n, *t.shape[1:])
        return v[(slice(None),) * (1 + e) + (0,) * (len(self.ranks) - e)].flatten(0, e + 1)

    def spread(self, t: torch.Tensor, e: int) -> torch.Tensor:
        """The inverse of shared for rows equal at levels >= e."""
        if e >= len(self.ranks):
            return t
        m = len(self.ranks)
        v = t.view(self.draws, *self.ranks[:e], *[1] * (m - e), self.n, *t.shape[1:])
        return v.expand(self.draws, *self.ranks, self.n, *t.shape[1:]).flatten(0, m + 1)


def scored(probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The probability each position's distribution probs (..., L, V) gives its token of x (..., L), at positions
    1..L-1 (position j's distribution is token j's: its context is the tokens before j), (..., L - 1)."""
    return probs[..., 1:, :].gather(-1, x[..., 1:, None])[..., 0]


@torch.no_grad()
def chain_likelihood(model, windows: torch.Tensor, *, steps: int | None = None, bridge: str = "sample",
                     sampler: str = "euler", grid: str = "quantile", draws: int = 8, top_k: int = 4,
                     later_k: int | None = 0, max_enumerated: int = 64, steer: float = 0.25,
                     line_steer: float = 0.0, draw_steer: float = 0.8, tolerance: float | None = None,
                     max_draws: int = 64, seed: int = 0, batch_size: int | None = None,
                     num_tokens: int | None = None) -> dict[str, Any]:
    """Held-out bits per token (positions 1..L-1) of the chain's own next-token distribution, the one its sampler
    reads the next token from: q(x) = E[softmax(last step's logits)](x) over the chain's noise and bridge draws
    (temperature 1, the context given), all blocks, `steps` steps (default B) of `sampler` down the quantile grid.

    Each token draw a later evaluation reads (with the `sample` bridge: after every evaluation but the last) is
    enumerated rather than drawn (token_enumeration: the scored token, one token drawn from the rest weighted by its
    mass, and the top_k tokens at the first draw, later_k at a later one): the later draws nearest the readout first, as
    many as keep the tree's leaves at most max_enumerated, the others drawn (later_k None: all of them drawn). q(x) =
    E_z0[ sum over the leaves of the product of their weights times the readout's q(x) ], each leaf one batched chain
    (positions are independent given the clean context), a branch's shared past computed once, each block's clean stream
    once for all of them (`denoise_cached`). Only the start noise is drawn, `draws` times, a `steer` share of them
    toward the scored token at a step's reach and a `line_steer` share along its line, weighted back (steered_noise).
    Why: a later block mostly keeps the token handed to it, so a drawn later token makes a chain's readout nearly 0 or
    1, and a rare start noise under which a later block turns another token into the scored one carries much of a poorly
    predicted token's probability: either makes -log2 of a mean of few draws far too high
    (benchmarks/results/chain-likelihood-draws). Where the tree leaves later draws drawn (many steps), a `draw_steer`
    share of the chains takes the scored token at one of them, or from one of them on, and is weighted back
    (SteeredDraws): with many steps the early states are mostly noise and the decision falls on the drawn levels, where
    a chain that turns to the scored token is rare under the blocks' own draws and carries a poorly predicted token's
    probability in the same way.

    The estimate of q is unbiased; its -log2 is biased up: in expectation an upper bound on the chain's bits, the
    bias estimated (LikelihoodTally: the delta method, and the fall from half the draws). tolerance: the draws are
    doubled (the new ones independent of the old) while that fall is above this many bits per token, up to
    max_draws. batch_size: chains per forward pass (at the widest level; None: 256 on a CPU, elsewhere as many as
    make 2^27 activations of a layer's input, at least 256; a batch's draws come from one generator, so another batch
    size gives other draws, and the result records it); num_tokens: the vocabulary's size, when the model has more
    ids (never drawn)."""
    if (draws < 2 or top_k < 0 or (later_k or 0) < 0 or max_draws < draws or min(steer, line_steer) < 0
            or steer + line_steer >= 1 or not 0 <= draw_steer < 1):
        raise ConfigError(f"the chain likelihood needs at least 2 draws (their spread gives its error and bias), "
                          f"top_k, later_k >= 0, max_draws >= draws, steer, line_steer >= 0 with steer + line_steer "
                          f"< 1 and 0 <= draw_steer < 1, got {draws}, {top_k}, {later_k}, {max_draws}, {steer}, "
                          f"{line_steer} and {draw_steer}")
    sigmas = chain_grid(model, steps, grid).to(windows.device, torch.float32)
    width = windows.shape[1] * model.blocks[0].E.shape[1]  # a chain's noisy stream: L positions x D
    batch_size = batch_size or (256 if windows.device.type == "cpu" else max(256, 2 ** 27 // width))
    read = evaluation_count(sampler, sigmas) - 1 if bridge == "sample" else 0  # the draws a later step reads
    ranks = [top_k + 2] + [1] * (read - 1) if read else []  # 1: drawn
    for e in range(read - 1, 0, -1):  # the later draws, nearest the readout first
        if later_k is None or math.prod(ranks) * (later_k + 2) > max_enumerated:
            break
        ranks[e] = later_k + 2
    chains = dict(sigmas=sigmas, bridge=bridge, sampler=sampler, ranks=ranks, seed=seed, batch_size=batch_size,
                  num_tokens=num_tokens, steer=steer, line_steer=line_steer, draw_steer=draw_steer)
    f = _chain_draws(model, windows, draws, 0, **chains)  # (draws, W, L - 1)
    result = _tally(f).result()
    while tolerance is not None and result["fall"] > tolerance and 2 * len(f) <= max_draws:
        f = torch.cat([f, _chain_draws(model, windows, len(f), len(f), **chains)])
        result = _tally(f).result()
    return {**result, "steps": len(sigmas) - 1, "bridge": bridge, "sampler": sampler, "draws": len(f),
            "batch_size": batch_size,
            "top_k": top_k if ranks else None, "later_k": later_k if read > 1 else None,
            "enumerated": math.prod(ranks), "drawn_later": ranks.count(1), "steer": steer, "tolerance": tolerance,
            **({"line_steer": line_steer} if line_steer else {}),
            **({"draw_steer": draw_steer} if 1 in ranks else {})}  # only where a later draw is drawn


def _tally(f: torch.Tensor) -> LikelihoodTally:
    """A LikelihoodTally of estimates f (draws, windows, T)."""
    tally = LikelihoodTally()
    tally.add(f)
    return tally


def steered_noise(model, x: torch.Tensor, sigmas: torch.Tensor, draws: int, g: torch.Generator, steer: float,
                  num_tokens: int | None, line: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Start noises eps (draws, n, L, D) drawn from a mixture that steers the chain toward each scored token, and
    their importance weights N(eps; 0, I) / mixture(eps) (draws, n, L). With probability 1 - steer - line, eps ~
    N(0, I). With probability steer, a later step k is chosen (its share below) and a token v other than the scored x
    with probability p(v) / (1 - p(x)) (p: the first block's distribution at z = 0), and eps ~ N(mu_kv, I) with
    mu_kv = REACH (E[x] - E[v]) (1 - sigma_k / sigma_0) / sigma_k: the shift that moves step k's state a REACH of the
    way from E[v] toward E[x] (its noise is sigma_k eps beside (1 - sigma_k / sigma_0) E[the tokens drawn], Euler's
    steps from sigma_0). With probability line, eps ~ N(a u, I), u the unit vector along E[x] - sum_v p(v) E[v] / (1 -
    p(x)) (v != x) and a one of LINE_SHIFTS magnitudes up to LINE_REACH alike: x ahead of every other token at once,
    by a margin that suits whichever step decides (a chain of many steps decides at a sigma no single reach fits).
    A noise under which a later block turns a drawn v into x is rare under N(0, I) and carries much of a poorly
    predicted token's probability; the weight (at most 1 / (1 - steer - line)) keeps the estimate of q unbiased
    whatever the shifts. Step k's share falls with how rare a noise of its reach is, exp(-|mu|^2 / 8) at a typical
    |E[x] - E[v]|: the last steps' small sigmas get none."""
    n, L = x.shape
    _, logits = model.route(_denoise_each, torch.zeros(n, L, model.blocks[0].E.shape[1], device=x.device),
                            sigmas[0] * torch.ones(n, device=x.device), tokens=x)
    p = usable_logits(logits, num_tokens).double().softmax(-1)  # (n, L, V)
    E = model.blocks[0].E.double()[:p.shape[-1]]  # (V, D)
    others = p.scatter(-1, x[..., None], 0.0)
    others = others / others.sum(-1, keepdim=True).clamp_min(1e-300)
    mu, log_pi = [], [torch.full((n, L, 1), math.log1p(-steer - line), dtype=torch.float64, device=x.device)]
    if steer > 0:
        sigma0, later = sigmas[0].double(), sigmas[1:][sigmas[1:] > 0].double()
        reach = REACH * (1 - later / sigma0) / later  # (K,): eps per unit of E[x] - E[v] at each later step
        typical = math.sqrt(2) * float(E.pow(2).sum(-1).mean().sqrt())
        share = torch.exp(-(reach * typical) ** 2 / 8)
        keep = share > 1e-3 * share.max()
        reach, share = reach[keep], share[keep] / share[keep].sum()
        mu_kv = reach[:, None, None, None, None] * (E[x][..., None, :] - E)  # (K, n, L, V, D)
        mu.append(mu_kv.permute(1, 2, 0, 3, 4).flatten(2, 3))  # (n, L, K V, D): step-major
        log_pi.append((math.log(steer) + share.log()[:, None] + others.log()[..., None, :]).flatten(2))  # (n, L, K V)
    if line > 0:
        toward = F.normalize(E[x] - others @ E, dim=-1)  # (n, L, D): from the others' mean to x
        a = torch.arange(1, LINE_SHIFTS + 1, dtype=torch.float64, device=x.device) * (LINE_REACH / LINE_SHIFTS)
        mu.append(a[:, None] * toward[..., None, :])  # (n, L, LINE_SHIFTS, D)
        log_pi.append(torch.full((n, L, LINE_SHIFTS), math.log(line / LINE_SHIFTS), dtype=torch.float64,
                                 device=x.device))
    mu, log_pi = torch.cat(mu, 2), torch.cat(log_pi, -1)  # (n, L, C, D), (n, L, 1 + C): unshifted, then each shift
    u = torch.rand(draws, n, L, generator=g, dtype=torch.float64).to(x.device)
    component = (log_pi.exp().cumsum(-1) < u[..., None]).sum(-1).clamp_max(mu.shape[2])  # (draws, n, L)
    shift = torch.cat([torch.zeros(n, L, 1, E.shape[1], dtype=torch.float64, device=x.device), mu], 2)
    shift = shift.expand(draws, -1, -1, -1, -1).gather(3, component[..., None, None].expand(-1, -1, -1, 1, E.shape[1]))
    eps = torch.randn(draws, n, L, E.shape[1], generator=g, dtype=torch.float64).to(x.device) + shift[..., 0, :]
    log_terms = log_pi[None, ..., 1:] + torch.einsum("anld,nlcd->anlc", eps, mu) - (mu ** 2).sum(-1) / 2
    log_mixture = torch.logsumexp(torch.cat([log_pi[None, ..., :1].expand(draws, -1, -1, -1), log_terms], -1), -1)
    return eps.float(), (-log_mixture).exp()


def _chain_draws(model, windows: torch.Tensor, draws: int, first: int, *, sigmas: torch.Tensor, bridge: str,
                 sampler: str, ranks: list[int], seed: int, batch_size: int,
                 num_tokens: int | None, steer: float = 0.0, line_steer: float = 0.0,
                 draw_steer: float = 0.0) -> torch.Tensor:
    """chain_likelihood's `draws` unbiased estimates of q(x_j | x_<j), (draws, W, L - 1), on enumeration trees of
    `ranks` (level e's branches; 1: its token drawn); `first`: how many were drawn before (the generators of later
    draws are new ones)."""
    levels, leaves = len(ranks), math.prod(ranks)
    D_dim = model.blocks[0].E.shape[1]
    per_batch = max(batch_size // (draws * leaves), 1)  # windows per batch
    out = []
    for i in range(0, len(windows), per_batch):
        x = windows[i:i + per_batch]
        n, L = x.shape
        tree = EnumerationTree(draws, ranks, n)
        g = make_generator(seed, "arlm-chain-likelihood", i, *([first] if first else []))
        xs = x.expand(draws * leaves, n, L).reshape(-1, L)  # (draws * leaves * n, L): draw, ranks, window
        state = {"calls": 0, "weights": torch.ones(draws * leaves * n, L, dtype=torch.float64, device=x.device)}
        clean: dict[int, KVCache] = {}  # each block's clean stream of these windows, run once for every chain

        def denoise(block, z: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor):
            e = state["calls"]
            z, sigma, tokens = (tree.shared(t, e) for t in (z, sigma, tokens))
            if id(block) not in clean:
                clean[id(block)] = block.clean_cache(x)
            D, logits = block.denoise_cached(z, at_each_position(sigma, tokens), clean[id(block)])
            return tree.spread(D, e), tree.spread(usable_logits(logits, num_tokens), e)

        def carry(block, D: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            e, state["calls"] = state["calls"], state["calls"] + 1
            if bridge != "sample":
                return block.estimate(D, logits, bridge)
            if e < levels:
                shared = tree.shared(logits, e)  # (draws * R_0 ... R_{e-1} * n, L, V)
                if ranks[e] == 1 and draw_steer > 0:
                    tokens, weights = steered.draw(e, shared, tree.shared(xs, e))
                elif ranks[e] == 1:
                    u = torch.rand(shared.shape[:-1], generator=g, dtype=torch.float64).to(x.device).flatten()
                    tokens = draw_token(shared.flatten(0, 1), 1.0, 1.0, False, u).view(1, *shared.shape[:-1])
                    weights = torch.ones(tokens.shape, dtype=torch.float64, device=x.device)
                else:
                    tokens, weights = token_enumeration(shared.double().softmax(-1), tree.shared(xs, e),
                                                        ranks[e] - 2, g)  # (R_e, rows, L)
                # Branch r of a row goes to level e's rank r: (R_e, draws, R_<e, n, L) -> (draws, R_<e, R_e, n, L).
                tokens, weights = (t.unflatten(1, (-1, n)).movedim(0, 1).flatten(0, 2) for t in (tokens, weights))
                state["weights"] = state["weights"] * tree.spread(weights, e + 1)
                return block.estimate(D, logits, bridge, tree.spread(tokens, e + 1))
            u = torch.rand(logits.shape[:-1], generator=g, dtype=torch.float64).to(x.device).flatten()
            return block.estimate(D, logits, bridge, draw_token(logits.flatten(0, 1), 1.0, 1.0, False, u).view(
                logits.shape[:-1]))

        chain = BridgedDenoiser(model, carry, denoise)
        steered = SteeredDraws([e for e, r in enumerate(ranks) if r == 1], draw_steer, g)
        if steer + line_steer > 0 and len(sigmas) > 2:
            eps, w = steered_noise(model, x, sigmas, draws, g, steer, num_tokens, line_steer)
            state["weights"] = state["weights"] * tree.spread(w.flatten(0, 1), 0)
        else:
            eps = torch.randn(draws, n, L, D_dim, generator=g).to(x.device)
        z = tree.spread(eps.flatten(0, 1), 0) * sigmas[0]  # every leaf of a draw starts from its noise
        SAMPLERS[sampler](chain, z, sigmas, extra_args={"tokens": xs}, disable=True)
        f = scored(chain.logits.double().softmax(-1), xs) * state["weights"][:, 1:]  # (draws * leaves * n, L - 1)
        out.append(f.view(draws, leaves, n, L - 1).sum(1))
    return torch.cat(out, 1)


class SteeredDraws:
    """The drawn levels of a chain's token draws (`levels`, consecutive, m of them), drawn from a mixture that puts
    the scored token x on the path and weighted back: with probability 1 - steer every level draws from the block's
    distribution p_k; otherwise, with probability steer / (2 m) each, level k alone takes x, or every level from k on
    takes x (the decision for x made at k and handed on), the other levels drawing from p_k. The mixture's density of
    a path is p(path) ((1 - steer) + steer / (2 m) sum_k (r_k + prod_{j >= k} r_j)), r_k = [y_k = x] / p_k(x), so
    the path's weight, its inverse, is at most 1 / (1 - steer) and keeps the chain's estimate unbiased. One choice
    per chain and position (the chains are the rows the drawn levels share)."""

    def __init__(self, levels: list[int], steer: float, g: torch.Generator):
        self.levels, self.steer, self.g = levels, steer, g
        self.first: torch.Tensor | None = None  # (rows, L): the first level index that takes x (m: none)
        self.only: torch.Tensor | None = None  # (rows, L): whether that level alone takes x
        self.log_r: list[torch.Tensor] = []  # log r_k of the levels drawn so far, (rows, L) each

    def draw(self, e: int, logits: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Level e's tokens and weights (1, rows, L) from the block's logits (rows, L, V) at the scored tokens x (rows,
        L); the weights are 1 but at the last level, which carries the path's weight."""
        m, i = len(self.levels), self.levels.index(e)
        if i == 0:
            u = torch.rand(x.shape, generator=self.g, dtype=torch.float64).to(x.device)
            pick = (u / self.steer * 2 * m).long().clamp_max(2 * m - 1)  # uniform over (level, kind) where u < steer
            self.first = torch.where(u < self.steer, pick % m, m)
            self.only, self.log_r = pick < m, []
        u = torch.rand(x.shape, generator=self.g, dtype=torch.float64).to(x.device).flatten()
        y = draw_token(logits.flatten(0, 1), 1.0, 1.0, False, u).view(x.shape)
        y = torch.where((self.first == i) | ((self.first < i) & ~self.only), x, y)
        log_p_x = logits.double().log_softmax(-1).gather(-1, x[..., None])[..., 0]  # (rows, L)
        self.log_r.append(torch.where(y == x, -log_p_x, -math.inf))
        if i < m - 1:
            return y[None], torch.ones(1, *x.shape, dtype=torch.float64, device=x.device)
        log_r = torch.stack(self.log_r)  # (m, rows, L)
        log_from = log_r.flip(0).cumsum(0)  # log prod_{j >= k} r_j for k = m - 1, ..., 0
        log_sum = torch.logsumexp(torch.cat([log_r, log_from]), 0)  # log sum_k (r_k + prod_{j >= k} r_j)
        return y[None], (1 / ((1 - self.steer) + self.steer / (2 * m) * log_sum.exp()))[None]
