"""The record and the allocation of :mod:`ptqkit.analysis.mixed` (no model here): the widths
a mixed-precision plan may take, its budget, its typed record (:class:`MixedPrecisionPlan`,
one :class:`LayerBits` per layer) and :func:`allocate`, which solves

    minimize  Σ_l Δ_l(b_l)   subject to   Σ_l n_l·b_l <= B·Σ_l n_l,   b_l in choices

(HAWQ-V3's integer program, Yao et al. 2021, arXiv:2011.10680, with measured ``Δ``)
exactly, as a multiple-choice knapsack by dynamic programming over the bits spent above the
all-lowest assignment: ``best_l[c] = min_j best_{l-1}[c - w_lj] + Δ_l(b_j)``, with
``w_lj = ceil(n_l·(b_j - b_min) / u)``. ``u = 1`` (exact) while that spare budget is at most
:data:`RESOLUTION` bits; above, ``u`` is ``1/RESOLUTION`` of it, each cost rounded *up*, so the
result never exceeds the budget. Of equal errors, the fewest bits win.

Low level: imports torch and :mod:`ptqkit.errors` / :mod:`ptqkit.spec` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..spec import MAX_BITS, MIN_BITS

#: the spare budget (bits above the all-lowest assignment) is solved exactly up to this many
#: bits; above it each layer's cost is rounded up to 1/RESOLUTION of it
RESOLUTION = 1 << 14
#: the default budget, bits per weight on average
DEFAULT_BUDGET_BITS = 5.0


def check_choices(choices: Any) -> tuple[int, ...]:
    """``choices`` as a sorted tuple of distinct ints in ``MIN_BITS..MAX_BITS``, or a
    :class:`ConfigError` naming it."""
    try:
        values = tuple(choices)
    except TypeError:
        raise ConfigError(f"mixed precision: choices must be bit widths, got {choices!r}") from None
    if not values:
        raise ConfigError("mixed precision: choices is empty; give bit widths, e.g. (4, 8)")
    for b in values:
        if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
            raise ConfigError(
                f"mixed precision: choices {values!r} hold {b!r}; each must be an int in "
                f"{MIN_BITS}..{MAX_BITS}"
            )
    return tuple(sorted(set(values)))


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


@dataclass(frozen=True)
class LayerBits:
    """One layer of a :class:`MixedPrecisionPlan`: its weight count, the width chosen, and the
    measured ``Δ(b)`` at each of the plan's choices (relative output noise energy with only
    this layer quantized, ``Σ (f - q)² / Σ f²``)."""

    name: str
    params: int
    bits: int
    errors: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "errors", tuple(float(e) for e in self.errors))
        if not (isinstance(self.name, str) and self.name and isinstance(self.params, int)):
            raise ConfigError(f"mixed precision: a layer needs a name and params: {self!r}")


@dataclass(frozen=True)
class MixedPrecisionPlan:
    """What :func:`mixed_precision` chose and measured: the budget (bits per weight; and the
    byte budget it came from, if any), the choices, the group size, each layer
    (:class:`LayerBits`) and the samples ``Δ`` was measured on. It is the options object of the
    recording technique: a dict of its fields (a saved file's) is read back into it."""

    budget_bits: float = DEFAULT_BUDGET_BITS
    choices: tuple[int, ...] = (4, 8)
    group_size: int | None = None
    layers: tuple[LayerBits, ...] = ()
    samples: int = 0
    budget_bytes: int | None = None
    #: the whole model's output noise ``Σ (f - q)² / Σ f²`` with these widths, measured
    measured_error: float | None = None
    #: the same with every layer at each choice (aligned with ``choices``)
    uniform_errors: tuple[float, ...] = ()
    #: why the plan is uniform when the allocation was not (it measured worse), else ""
    note: str = ""

    def __post_init__(self) -> None:
        choices = check_choices(self.choices)
        object.__setattr__(self, "choices", choices)
        object.__setattr__(self, "uniform_errors", tuple(float(e) for e in self.uniform_errors))
        layers = tuple(lb if isinstance(lb, LayerBits) else LayerBits(**lb) for lb in self.layers)
        object.__setattr__(self, "layers", layers)
        if not layers:
            raise ConfigError(
                "techniques['mixed_precision'] holds the plan ptqkit.mixed_precision(...) "
                "returns in its config; it cannot be switched on by itself"
            )
        for lb in layers:
            if lb.bits not in choices or len(lb.errors) != len(choices):
                raise ConfigError(
                    f"mixed precision: layer {lb.name!r}: {lb.bits} bits and {len(lb.errors)} "
                    f"measured errors do not fit the choices {choices}"
                )

    @property
    def bits(self) -> dict[str, int]:
        """The chosen width of each layer."""
        return {lb.name: lb.bits for lb in self.layers}

    @property
    def average_bits(self) -> float:
        """``Σ n_l·b_l / Σ n_l``: the achieved bits per weight (at most ``budget_bits``)."""
        return sum(lb.params * lb.bits for lb in self.layers) / sum(lb.params for lb in self.layers)

    @property
    def predicted_error(self) -> float:
        """``Σ_l Δ_l(b_l)``: the objective the allocation minimized."""
        return sum(lb.errors[self.choices.index(lb.bits)] for lb in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (lists, not tuples), with the achieved and predicted values."""
        return {
            "budget_bits": self.budget_bits,
            "budget_bytes": self.budget_bytes,
            "choices": list(self.choices),
            "group_size": self.group_size,
            "samples": self.samples,
            "average_bits": self.average_bits,
            "predicted_error": self.predicted_error,
            "measured_error": self.measured_error,
            "uniform_errors": list(self.uniform_errors),
            "note": self.note,
            "layers": [
                {"name": lb.name, "params": lb.params, "bits": lb.bits, "errors": list(lb.errors)}
                for lb in self.layers
            ],
        }

    def table(self) -> str:
        """One row per layer: weights, chosen bits, ``Δ`` at each choice."""
        head = f"{'layer':<32} {'params':>9} {'bits':>4} " + " ".join(
            f"{'Δ@' + str(b):>10}" for b in self.choices
        )
        rows = [head, "-" * len(head)]
        for lb in self.layers:
            errs = " ".join(f"{e:>10.3g}" for e in lb.errors)
            rows.append(f"{lb.name[:32]:<32} {lb.params:>9} {lb.bits:>4} {errs}")
        rows.append(
            f"average {self.average_bits:.3f} bits per weight (budget {self.budget_bits:.3f}), "
            f"Σ Δ = {self.predicted_error:.4g}, measured {self.measured_error or math.nan:.4g} on "
            f"{self.samples} samples; uniform: "
            + ", ".join(f"W{b} {e:.4g}" for b, e in zip(self.choices, self.uniform_errors))
        )
        return "\n".join(rows + ([self.note] if self.note else []))


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
