import pytest
import torch

from diffusionblocks.blocks import BlockwiseDenoiser
from diffusionblocks.noise import LogNormalSigma, Partition, get_sigmas_karras, get_sigmas_quantile, steps_per_block
from diffusionblocks.sampling import SAMPLERS, CFGDenoiser, sample_euler, sample_heun

MU, S = 0.3, 0.5  # data y ~ N(MU, S^2) per dimension


def gaussian_denoiser(x, sigma, **_):
    """The exact denoiser E[y | y + sigma eps = x] for y ~ N(MU, S^2)."""
    s2 = sigma[:, None] ** 2
    return MU + S ** 2 / (S ** 2 + s2) * (x - MU)


def run(sampler, sigmas, n=20_000):
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    return sampler(gaussian_denoiser, x, sigmas.double(), disable=True)


# Heun's trapezoid is poor over the quantile grid's first step (sigma_max=80 to about 3 at 40 steps): it
# needs many steps there, where Euler and DPM-Solver++ are nearly exact.
@pytest.mark.parametrize("name,grid,steps", [("euler", "quantile", 200), ("euler", "karras", 200),
                                             ("heun", "quantile", 200), ("heun", "karras", 40),
                                             ("dpmpp_2m", "quantile", 40), ("dpmpp_2m", "karras", 40)])
def test_samplers_reproduce_gaussian_data(name, grid, steps):
    sigmas = get_sigmas_quantile(LogNormalSigma(), steps) if grid == "quantile" else get_sigmas_karras(steps, 0.002, 80)
    y = run(SAMPLERS[name], sigmas)
    assert y.mean().item() == pytest.approx(MU, abs=0.02)
    assert y.std().item() == pytest.approx(S, abs=0.02)


def test_heun_beats_euler_at_few_steps():
    sigmas = get_sigmas_karras(20, 0.002, 80)
    err = {f.__name__: abs(run(f, sigmas).std().item() - S) for f in (sample_euler, sample_heun)}
    assert err["sample_heun"] < err["sample_euler"]


def test_sampler_contract_and_callback():
    sigmas = get_sigmas_quantile(LogNormalSigma(), 5)
    for f in SAMPLERS.values():
        seen = []
        out = f(gaussian_denoiser, torch.randn(3, 2, dtype=torch.float64) * 80, sigmas.double(),
                callback=lambda d: seen.append(d["i"]), disable=True)
        assert out.shape == (3, 2)
        assert seen == list(range(5))


class Recorder(torch.nn.Module):
    """A block that records the sigmas it is called with and returns a fixed value."""

    def __init__(self, b):
        super().__init__()
        self.b, self.calls = b, []

    def forward(self, x, sigma, **cond):
        self.calls.append(sigma.clone())
        return gaussian_denoiser(x, sigma)


def test_router_uses_block_zero_for_highest_sigma_and_each_block_for_its_own_steps():
    p = Partition(LogNormalSigma(), 3)
    blocks = [Recorder(b) for b in range(3)]
    model = BlockwiseDenoiser(blocks, p)
    sigmas = get_sigmas_quantile(LogNormalSigma(), 50)
    sample_euler(model, torch.randn(4, 2, dtype=torch.float64) * 80, sigmas.double(), disable=True)
    assert [len(b.calls) for b in blocks] == steps_per_block(p, sigmas) == [17, 16, 17]
    assert blocks[0].calls[0][0] == 80
    for b, blk in enumerate(blocks):
        lo, hi = p.block_range(b)
        for s in blk.calls:
            assert ((s >= lo) & (s <= hi)).all()
    # Block 0's calls come before block 1's, before block 2's.
    assert max(c[0] for c in blocks[1].calls) < min(c[0] for c in blocks[0].calls)


def test_router_routes_mixed_sigmas_per_sample():
    p = Partition(LogNormalSigma(), 3)
    blocks = [Recorder(b) for b in range(3)]
    model = BlockwiseDenoiser(blocks, p)
    sigma = torch.tensor([50.0, 0.01, 0.3, 2.0], dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64)
    out = model(x, sigma)
    assert torch.allclose(out, gaussian_denoiser(x, sigma))
    assert [sorted(torch.cat(b.calls).tolist()) for b in blocks] == [[2.0, 50.0], [0.3], [0.01]]


def test_single_block_router_equals_plain_denoiser():
    model = BlockwiseDenoiser([Recorder(0)], Partition(LogNormalSigma(), 1))
    sigmas = get_sigmas_quantile(LogNormalSigma(), 10).double()
    x = torch.randn(5, 2, dtype=torch.float64) * 80
    assert torch.equal(sample_euler(model, x, sigmas, disable=True), sample_euler(gaussian_denoiser, x, sigmas, disable=True))


def test_cfg_combines_conditional_and_unconditional():
    def D(x, sigma, class_labels):
        return x * 0 + class_labels[:, None].double()  # "denoises" to the label value; null class = 10

    x, sigma, labels = torch.zeros(3, 2, dtype=torch.float64), torch.ones(3), torch.tensor([1, 2, 3])
    for w in (0.0, 1.0, 2.0):
        out = CFGDenoiser(D, w, null_class=10)(x, sigma, class_labels=labels)
        assert torch.allclose(out, (10 + w * (labels - 10))[:, None].double().expand(3, 2))
