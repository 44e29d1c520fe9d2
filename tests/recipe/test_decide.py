"""tune's decision rule: the signed-rank test against scipy's, and ties that keep the incumbent."""

from __future__ import annotations

import pytest
import torch

from ptqkit.recipe.decide import MIN_PAIRS, Z_95, judge, signed_rank_z


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rounded", [False, True])
def test_signed_rank_z_matches_scipy(seed, rounded):
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(40, generator=g, dtype=torch.float64) + 0.3
    if rounded:  # ties in |d| and exact zeros
        d = (d * 2).round() / 2
    res = stats.wilcoxon(d.numpy(), zero_method="wilcox", correction=False, method="approx")
    z_ref = res.zstatistic if hasattr(res, "zstatistic") else None
    if z_ref is None:  # older scipy: recover |z| from the two-sided p-value
        z_ref = abs(stats.norm.ppf(res.pvalue / 2))
    assert abs(signed_rank_z(d)) == pytest.approx(abs(z_ref), rel=1e-9)
    assert signed_rank_z(d) > 0  # positive differences: the first is worse


def test_hand_example_and_degenerate_cases():
    # ranks 1..10, W+ = 1 + 3 + 4 + 6 + 7 + 8 + 9 + 10 = 48, mu = 27.5, var = 10·11·21/24
    d = torch.tensor([1.0, -2, 3, 4, -5, 6, 7, 8, 9, 10])
    assert signed_rank_z(d) == pytest.approx(20.5 / (10 * 11 * 21 / 24) ** 0.5)
    assert signed_rank_z(torch.zeros(40)) == 0.0
    assert signed_rank_z(torch.cat([d, torch.tensor([float("nan"), 0.0])])) == signed_rank_z(d)
    # an infinite loss counts as the largest difference, not as missing
    inf = torch.tensor([float("inf")])
    assert signed_rank_z(torch.cat([d, inf])) > signed_rank_z(d)
    # fewer than MIN_PAIRS differing samples say nothing, however one-sided
    assert signed_rank_z(-torch.arange(1.0, MIN_PAIRS)) == 0.0


def test_a_chain_of_ties_cannot_leave_the_base():
    """Each candidate a hair better than the last on average (a tie), but together they drift
    far from the base: none is taken, the base stays."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(32, generator=g, dtype=torch.float64)
    incumbent = base
    for step in range(6):
        noise = 0.3 * torch.randn(32, generator=g, dtype=torch.float64)
        cand = incumbent * (1 + noise) - 0.005
        v = judge(cand, incumbent, base, agreement_ok=True)
        if v.taken:
            incumbent = cand
        assert signed_rank_z(incumbent - base) <= Z_95, step
    # a real improvement (every sample's loss halved) is taken
    v = judge(base / 2, base, base, agreement_ok=True)
    assert v.taken and "better" in v.reason()
    assert not judge(base / 2, base, base, agreement_ok=False).taken


def test_better_than_incumbent_but_worse_than_base_is_refused():
    base = torch.linspace(0.1, 1.0, 32, dtype=torch.float64)
    incumbent = base * 3  # (an incumbent forced in, e.g. the fallback)
    cand = base * 2
    v = judge(cand, incumbent, base, agreement_ok=True)
    assert v.z_incumbent < -Z_95 and v.z_base > Z_95 and not v.taken
    assert "worse than the base" in v.reason()
