"""``mixed_precision``: the plan :func:`ptqkit.mixed_precision` chose (per-layer weight widths
under a bit budget, HAWQ-V3's integer program with measured errors: Yao et al. 2021,
arXiv:2011.10680; :mod:`ptqkit.analysis.mixed`), recorded in ``ptq_info``.

The widths themselves are per-layer :class:`~ptqkit.Scope` objects of the config, which the
capture step applies; this technique changes nothing. It holds the plan as its options
(:class:`MixedPrecisionPlan`, in ``config.techniques["mixed_precision"]``) and puts it, with
the widths the layers really got, in ``ptq_info.details["mixed_precision"]``. It registers
here, with every other technique, so that a config read back from a file that holds a plan
quantizes in any process (the search itself, which quantizes the model several times, stays
in :mod:`ptqkit.analysis.mixed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from ..config import PTQConfig
from ..errors import ConfigError
from ..quant.modules import quant_layers
from ..records import MixedPrecisionRecord
from ..spec import MAX_BITS, MIN_BITS
from ..stage import Context
from ..technique import Technique, register

NAME: Final = "mixed_precision"
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
    """What :func:`ptqkit.mixed_precision` chose and measured: the budget (bits per weight; and
    the byte budget it came from, if any), the choices, the group size, each layer
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

    def to_dict(self) -> MixedPrecisionRecord:
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


def plan_of(config: PTQConfig) -> MixedPrecisionPlan | None:
    """The plan in ``config`` (also one read back from a saved file), or ``None``."""
    plan = TECHNIQUE.options_in(config)
    return plan if isinstance(plan, MixedPrecisionPlan) else None


def _record(ctx: Context) -> None:
    """Put the plan, and the widths the layers really got, in ``ptq_info.details``; warn when
    they differ (the scopes were edited, or the config was given another model)."""
    plan = plan_of(ctx.config)
    assert plan is not None  # the technique runs only when the config holds one
    layers = quant_layers(ctx.qmodel)
    got = {lb.name: layers[lb.name].spec.bits if lb.name in layers else None for lb in plan.layers}
    record = plan.to_dict()
    record["realized_bits"] = got
    ctx.info.details[NAME] = record
    off = [lb.name for lb in plan.layers if got[lb.name] != lb.bits]
    if off:
        ctx.info.warn(
            f"mixed precision: {len(off)} layer(s) do not have the planned width ({off[:5]}): "
            "the scopes were changed after ptqkit.mixed_precision, or this is another model"
        )


def _enabled(config: PTQConfig) -> bool:
    return config.techniques.get(NAME, False) is not False


#: records the plan; it changes nothing (the scopes did that at capture)
TECHNIQUE = register(
    Technique(
        NAME,
        890,  # after bias correction (800), before the float fallback (900)
        _record,
        enabled=_enabled,
        fields=("techniques",),
        options=MixedPrecisionPlan,
        reference="Yao et al. 2021 (HAWQ-V3), arXiv:2011.10680",
    )
)

__all__ = [
    "DEFAULT_BUDGET_BITS",
    "NAME",
    "TECHNIQUE",
    "LayerBits",
    "MixedPrecisionPlan",
    "check_choices",
    "plan_of",
]
