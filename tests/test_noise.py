import math

import pytest
import torch

from diffusionblocks.noise import (LogNormalSigma, Partition, get_sigmas_karras, get_sigmas_quantile, sample_truncated,
                                   steps_per_block)

AXIS = LogNormalSigma()
TABLE = {  # method.md section 2, ascending
    2: [0.002, 0.3012, 80],
    3: [0.002, 0.1796, 0.5050, 80],
    4: [0.002, 0.1341, 0.3012, 0.6766, 80],
    6: [0.002, 0.0943, 0.1796, 0.3012, 0.5050, 0.9617, 80],
}


@pytest.mark.parametrize("B", sorted(TABLE))
def test_equiprobable_boundaries_match_table(B):
    s = Partition(AXIS, B).boundaries
    assert torch.allclose(s, torch.tensor(TABLE[B], dtype=torch.float64), atol=1e-3, rtol=0)


@pytest.mark.parametrize("B", [2, 3, 4, 6])
def test_equiprobable_blocks_have_equal_mass(B):
    p = Partition(AXIS, B)
    q = AXIS.cdf(p.boundaries)
    mass = q.diff() / (q[-1] - q[0])
    assert torch.allclose(mass, torch.full((B,), 1 / B, dtype=torch.float64), atol=1e-12)


def test_uniform_partition_has_equal_log_widths():
    s = Partition(AXIS, 4, kind="uniform").boundaries
    widths = s.log().diff()
    assert torch.allclose(widths, widths.mean().expand(4), atol=1e-12)
    assert s[0] == 0.002 and s[-1] == 80


def test_block_zero_owns_highest_noise():
    p = Partition(AXIS, 3)
    assert p.block_range(0) == pytest.approx((0.5050, 80), abs=1e-3)
    assert p.block_range(2) == pytest.approx((0.002, 0.1796), abs=1e-3)
    assert p.owner(torch.tensor([80.0, 1.0, 0.3, 0.1, 0.002])).tolist() == [0, 0, 1, 2, 2]


def test_overlap_ranges_b3():
    p = Partition(AXIS, 3, gamma=0.05)
    expected = {2: (0.002, 0.2249), 1: (0.1706, 0.5319), 0: (0.3921, 80)}  # method.md
    for b, rng in expected.items():
        assert p.training_range(b) == pytest.approx(rng, abs=1e-4)
    assert Partition(AXIS, 3, gamma=0.0).training_range(1) == pytest.approx(p.block_range(1))


def test_overlap_formula_in_log_space():
    p = Partition(AXIS, 4, gamma=0.1)
    lo, hi = p.block_range(1)
    r = hi / lo
    assert p.training_range(1) == pytest.approx((lo * r ** -0.1, hi * r ** 0.1), rel=1e-9)


@pytest.mark.parametrize("B", [2, 3, 4])
def test_truncated_sampler_stays_in_range_and_puts_mass_1_over_B_per_block(B):
    p = Partition(AXIS, B, gamma=0.0)
    g = torch.Generator().manual_seed(0)
    s = sample_truncated(AXIS, 200_000, AXIS.lo, AXIS.hi, generator=g)
    assert s.min() >= AXIS.lo and s.max() <= AXIS.hi
    frac = torch.bincount(p.owner(s), minlength=B).double() / len(s)
    assert torch.allclose(frac, torch.full((B,), 1 / B, dtype=torch.float64), atol=0.005)
    for b in range(B):
        lo, hi = p.training_range(b)
        sb = p.sample(b, 10_000, generator=g)
        assert sb.min() >= lo and sb.max() <= hi
        assert (p.owner(sb) == b).all()


def test_truncated_sampler_follows_lognormal_density():
    g = torch.Generator().manual_seed(1)
    s = sample_truncated(AXIS, 200_000, 0.1, 1.0, generator=g)
    # Median of the truncated density: the midpoint in CDF.
    q = (AXIS.cdf(torch.tensor(0.1)) + AXIS.cdf(torch.tensor(1.0))) / 2
    assert s.median().item() == pytest.approx(AXIS.icdf(q).item(), rel=0.01)


def test_quantile_grid_splits_steps_evenly():
    p = Partition(AXIS, 3)
    sigmas = get_sigmas_quantile(AXIS, 50)
    assert len(sigmas) == 51 and sigmas[0] == 80 and sigmas[-2] == 0.002 and sigmas[-1] == 0
    assert (sigmas.diff() < 0).all()
    assert steps_per_block(p, sigmas) == [17, 16, 17]  # method.md section 4


def test_karras_grid():
    sigmas = get_sigmas_karras(10, 0.002, 80.0, rho=7.0)
    assert sigmas[0].item() == pytest.approx(80) and sigmas[-2].item() == pytest.approx(0.002)
    assert sigmas[-1] == 0 and (sigmas.diff() < 0).all()
    # Karras et al. Eq. 5: equally spaced in sigma^(1/rho).
    r = sigmas[:-1] ** (1 / 7)
    assert torch.allclose(r.diff(), r.diff().mean().expand(9))
    assert math.isclose(float(r[1]), 80 ** (1 / 7) + (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 9, rel_tol=1e-9)
