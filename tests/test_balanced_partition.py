"""The fitted ("balanced") partition: boundaries at equal shares of a measured curve of what remains undecided."""

import math

import pytest
import torch

from diffusionblocks.noise import LogNormalSigma, MaskingTime, Partition, RemainingCurve, balanced_boundaries

AXIS = LogNormalSigma()
LEVELS = torch.logspace(math.log10(0.002), math.log10(80), 41, dtype=torch.float64)  # 41 levels over the axis


@pytest.mark.parametrize("B", [2, 3, 4])
def test_a_curve_linear_in_log_sigma_gives_equal_widths_in_log_sigma(B):
    curve = RemainingCurve.fit(AXIS, LEVELS, 3.0 + 0.5 * LEVELS.log())
    fitted = balanced_boundaries(AXIS, curve, B)
    uniform = Partition(AXIS, B, kind="uniform").boundaries[1:-1]
    assert torch.allclose(torch.tensor(fitted, dtype=torch.float64), uniform, rtol=1e-9)
    assert curve.shares(Partition(AXIS, B, kind="balanced", fitted=fitted)) == pytest.approx([1 / B] * B, abs=1e-9)


def test_steps_in_the_curve_put_the_boundaries_inside_the_steps():
    # Two steps of one bit each, at sigma 0.1 and 3: B = 3 cuts at R = 2/3 and 4/3, inside each step.
    R = (LEVELS > 0.1).double() + (LEVELS > 3.0).double()
    s1, s2 = balanced_boundaries(AXIS, RemainingCurve.fit(AXIS, LEVELS, R), 3)
    for s, step in ((s1, 0.1), (s2, 3.0)):
        below, above = LEVELS[LEVELS <= step].max(), LEVELS[LEVELS > step].min()
        assert below < s < above
    # The equal-density partition (0.1796, 0.5050) gives each step to an end block and nothing to the middle one.
    shares = RemainingCurve.fit(AXIS, LEVELS, R).shares(Partition(AXIS, 3))
    assert shares == pytest.approx([0.5, 0.0, 0.5], abs=1e-9)


def test_noisy_measurements_are_fitted_non_decreasing_and_shares_add_up():
    g = torch.Generator().manual_seed(0)
    truth = torch.sigmoid(2 * (LEVELS.log() + 1))  # the decision made around sigma = exp(-1)
    curve = RemainingCurve.fit(AXIS, LEVELS, truth + 0.05 * torch.randn(len(LEVELS), generator=g, dtype=torch.float64))
    assert (curve.R.diff() >= 0).all()
    fitted = balanced_boundaries(AXIS, curve, 4)
    p = Partition(AXIS, 4, kind="balanced", fitted=fitted)
    assert sum(curve.shares(p)) == pytest.approx(1.0)
    assert curve.shares(p) == pytest.approx([0.25] * 4, abs=1e-9)
    # The sigmoid's middle half lies within about +-0.55 of ln sigma = -1: the inner boundaries close around it.
    assert all(abs(math.log(s) + 1) < 1.2 for s in fitted)


def test_owner_routes_by_the_fitted_boundaries():
    p = Partition(AXIS, 3, kind="balanced", fitted=(0.05, 2.0))
    s = torch.tensor([0.01, 0.049, 0.05, 0.5, 1.99, 2.0, 50.0])
    # Block 0 owns the noisiest range; a level on a boundary belongs to the noisier block.
    assert p.owner(s).tolist() == [2, 2, 1, 1, 1, 0, 0]
    assert p.block_range(0) == (2.0, 80.0) and p.block_range(2) == (0.002, 0.05)


def test_masking_time_axis_is_balanced_in_t():
    axis = MaskingTime()
    t = torch.linspace(0, 1, 21, dtype=torch.float64)
    fitted = balanced_boundaries(axis, RemainingCurve.fit(axis, t, t ** 2), 2)  # half the bits above t = 1/sqrt(2)
    assert fitted[0] == pytest.approx(math.sqrt(0.5), abs=0.01)


@pytest.mark.parametrize("kwargs", [dict(kind="balanced"), dict(kind="balanced", fitted=(0.5,)),
                                    dict(kind="balanced", fitted=(2.0, 0.5)), dict(kind="balanced", fitted=(0.5, 90.0)),
                                    dict(kind="equiprobable", fitted=(0.5, 2.0))])
def test_bad_fitted_boundaries_are_refused(kwargs):
    with pytest.raises(ValueError):
        Partition(AXIS, 3, **kwargs)


def test_a_flat_curve_is_refused():
    with pytest.raises(ValueError, match="flat"):
        balanced_boundaries(AXIS, RemainingCurve.fit(AXIS, LEVELS, torch.ones_like(LEVELS)), 3)


@pytest.mark.parametrize("kind", ["equiprobable", "uniform"])
@pytest.mark.parametrize("per_block", [1, 2, 5])
def test_the_block_grid_gives_each_block_its_own_steps(kind, per_block):
    from diffusionblocks.noise import sigma_grid, steps_per_block
    p = Partition(AXIS, 3, kind=kind)
    s = sigma_grid(AXIS, 3 * per_block, "blocks", partition=p)
    assert s[0] == AXIS.hi and s[-1] == 0 and bool((s.diff() < 0).all())
    assert steps_per_block(p, s) == [per_block] * 3
    assert float(s[:-1].min()) > AXIS.lo  # no step where a block returns its input
    with pytest.raises(ValueError, match="partition"):
        sigma_grid(AXIS, 3, "blocks")


def test_decision_shares_split_what_the_chain_removes_by_block():
    from diffusionblocks.metrics import decision_shares

    # 6 bits at the start; block 0 takes it to 2.5 in two steps, block 1 to 2.4, block 2 back up to 2.5.
    rows = decision_shares(6.0, [3.0, 2.5, 2.4, 2.5], [0, 0, 1, 2])
    assert [(r["block"], r["steps"]) for r in rows] == [(0, 2), (1, 1), (2, 1)]
    assert [r["share"] for r in rows] == pytest.approx([3.5 / 3.5, 0.1 / 3.5, -0.1 / 3.5])
    assert sum(r["removed"] for r in rows) == pytest.approx(6.0 - 2.5)
    # A chain that ends worse than it started has no shares to give.
    worse = decision_shares(0.9, [0.3, 0.95], [0, 1])
    assert [r["removed"] for r in worse] == pytest.approx([0.6, -0.65]) and all(r["share"] != r["share"] for r in worse)


def _knots(levels: torch.Tensor, remaining: torch.Tensor) -> tuple[tuple[float, float], ...]:
    return tuple(zip(levels.tolist(), remaining.tolist()))


def test_the_fitted_density_of_a_curve_linear_in_log_sigma_is_uniform_in_log_sigma():
    """R linear in ln sigma: every stretch of ln sigma decides as much, so the draws are uniform in ln sigma (the
    floor is uniform too): within each block's training range, in deciles, and within a few binomial SDs."""
    from diffusionblocks.noise import fitted_cdf
    curve = _knots(LEVELS, LEVELS.log() - math.log(AXIS.lo))
    p = Partition(AXIS, 3, kind="balanced", fitted=(0.1, 2.0), curve=curve)
    g = torch.Generator().manual_seed(0)
    n = 20000
    for b in range(3):
        lo, hi = p.training_range(b)
        s = p.sample(b, n, generator=g)
        assert float(s.min()) >= lo and float(s.max()) <= hi
        u = (s.log() - math.log(lo)) / (math.log(hi) - math.log(lo))
        counts = torch.histc(u, bins=10, min=0, max=1)
        assert float((counts - n / 10).abs().max()) < 5 * math.sqrt(n * 0.1 * 0.9)
    w = torch.tensor([math.log(AXIS.lo), 0.0, math.log(AXIS.hi)], dtype=torch.float64)
    assert fitted_cdf(AXIS, curve, w).tolist() == pytest.approx(
        [0.0, -math.log(AXIS.lo) / (math.log(AXIS.hi) - math.log(AXIS.lo)), 1.0])


def test_the_fitted_density_puts_its_draws_where_the_curve_steps():
    """A curve that rises only between sigma 0.3 and 0.4: all but the floor's share of the draws land there (the
    floor spreads DENSITY_FLOOR of the mass evenly over ln sigma), stratified or not; the training density's
    draws, for comparison, mostly do not."""
    from diffusionblocks.noise import DENSITY_FLOOR
    levels = torch.cat([LEVELS, torch.tensor([0.3, 0.4], dtype=torch.float64)]).sort().values
    R = ((levels.log() - math.log(0.3)) / math.log(0.4 / 0.3)).clamp(0, 1)
    p = Partition(AXIS, 1, curve=_knots(levels, R))
    n = 20000
    width = math.log(0.4 / 0.3) / (math.log(AXIS.hi) - math.log(AXIS.lo))
    expected = (1 - DENSITY_FLOOR) + DENSITY_FLOOR * width
    for stratified in (False, True):
        s = p.sample(0, n, generator=torch.Generator().manual_seed(1), stratified=stratified)
        inside = float(((s >= 0.3) & (s <= 0.4)).double().mean())
        assert inside == pytest.approx(expected, abs=5 * math.sqrt(expected * (1 - expected) / n))
    plain = Partition(AXIS, 1).sample(0, n, generator=torch.Generator().manual_seed(1))
    assert float(((plain >= 0.3) & (plain <= 0.4)).double().mean()) < 0.2


def test_a_fitted_density_is_a_balanced_partitions_only():
    from diffusionblocks.config import ConfigError
    from diffusionblocks.tasks import apply_overrides, default_config
    with pytest.raises(ConfigError, match="blocks.density"):
        apply_overrides(default_config("arlm"), ["blocks.density=fitted"])
    with pytest.raises(ConfigError, match="blocks.density"):
        apply_overrides(default_config("arlm"), ["blocks.density=cdcd"])
    with pytest.raises(ConfigError, match="blocks.curve"):
        apply_overrides(default_config("arlm"), ["blocks.partition=balanced", "blocks.curve=[[0.1,1.0],[0.05,2.0]]"])
