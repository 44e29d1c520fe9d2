"""The allocation of :mod:`ptqkit.analysis.mixed` (no model here): the check of a budget and
:func:`allocate`, which solves

    minimize  Σ_l Δ_l(b_l)   subject to   Σ_l n_l·b_l <= B·Σ_l n_l,   b_l in choices

(HAWQ-V3's integer program, Yao et al. 2021, arXiv:2011.10680, with measured ``Δ``)
exactly, as a multiple-choice knapsack by dynamic programming over the bits spent above the
all-lowest assignment: ``best_l[c] = min_j best_{l-1}[c - w_lj] + Δ_l(b_j)``, with
``w_lj = ceil(n_l·(b_j - b_min) / u)``. ``u = 1`` (exact) while that spare budget is at most
:data:`RESOLUTION` bits; above, ``u`` is ``1/RESOLUTION`` of it, each cost rounded *up*, so the
result never exceeds the budget. Of equal errors, the fewest bits win.

The plan's typed record (:class:`MixedPrecisionPlan`, one :class:`LayerBits` per layer), the
default budget and the check of the widths live with the technique that records the plan
(:mod:`ptqkit.techniques.mixed_precision`, registered with every technique); they are
re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigError
from ..techniques.mixed_precision import (
    DEFAULT_BUDGET_BITS,
    LayerBits,
    MixedPrecisionPlan,
    check_choices,
)

#: the spare budget (bits above the all-lowest assignment) is solved exactly up to this many
#: bits; above it each layer's cost is rounded up to 1/RESOLUTION of it
RESOLUTION = 1 << 14


def check_budget(bits: Any, choices: tuple[int, ...], what: str) -> float:
    """``bits`` (bits per weight on average) as a float within the ``choices``' range."""
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits):
        raise ConfigError(f"mixed precision: {what} must be a finite number, got {bits!r}")
    if not choices[0] <= bits <= choices[-1]:
        side = "below the smallest" if bits < choices[0] else "above the largest"
        raise ConfigError(
            f"mixed precision: {what} is {bits:g} bits per weight, {side} choice in {choices}: "
            "give a budget between them (or other choices)"
        )
    return float(bits)


def allocate(
    params: Sequence[int], errors: Sequence[Sequence[float]], choices: Sequence[int], budget: int
) -> list[int]:
    """The widths (one per layer) minimizing ``Σ_l errors[l][j_l]`` subject to
    ``Σ_l params[l]·choices[j_l] <= budget`` (bits in all), by dynamic programming over the
    spare bits ``budget - min(choices)·Σ params`` (module docstring); non-finite errors count
    as infinite. ``choices`` sorted ascending."""
    lo = choices[0]
    spare = budget - lo * sum(params)
    if spare < 0:
        raise ConfigError(f"mixed precision: a budget of {budget} bits is below all-{lo}-bit")
    unit = max(1, -(-spare // RESOLUTION))
    cap = spare // unit
    best = torch.full((cap + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    picks: list[torch.Tensor] = []
    costs: list[list[int]] = []
    for n, errs in zip(params, errors):
        cost = [-(-n * (b - lo) // unit) for b in choices]
        new = torch.full_like(best, math.inf)
        pick = torch.zeros(cap + 1, dtype=torch.int64)
        for j, (w, e) in enumerate(zip(cost, errs)):
            if w > cap:
                continue
            cand = torch.full_like(best, math.inf)
            cand[w:] = best[: cap + 1 - w] + (e if math.isfinite(e) else math.inf)
            take = cand < new
            new = torch.where(take, cand, new)
            pick[take] = j
        best = new
        picks.append(pick)
        costs.append(cost)
    c = int(torch.argmin(best))  # the least error; of equal ones, the fewest bits
    out: list[int] = []
    for pick, cost in zip(reversed(picks), reversed(costs)):
        j = int(pick[c])
        out.append(choices[j])
        c -= cost[j]
    return out[::-1]


__all__ = [
    "DEFAULT_BUDGET_BITS",
    "RESOLUTION",
    "LayerBits",
    "MixedPrecisionPlan",
    "allocate",
    "check_budget",
    "check_choices",
]
