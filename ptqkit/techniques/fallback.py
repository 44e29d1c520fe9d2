"""The accuracy fallback: with a target (``max_degradation`` or ``min_sqnr_db``), the fewest
layers kept in float that meet it, chosen from the measured sensitivity
(:mod:`ptqkit.correct.fallback`)."""

from __future__ import annotations

from ..config import PTQConfig
from ..stage import Context
from ..technique import CostBasis, Technique, register

#: prior cost of the fallback, in quantized passes over the calibration data per layer
FALLBACK_PASSES_PER_LAYER = 1.0


def _fallback(ctx: Context) -> None:
    from ..correct.fallback import fallback

    fallback(ctx.qmodel, ctx.data, ctx.config, ctx.info)


def has_target(config: PTQConfig) -> bool:
    """Whether ``config`` asks for an accuracy target."""
    return config.max_degradation is not None or config.min_sqnr_db is not None


def _estimate(config: PTQConfig, basis: CostBasis) -> float:
    return (2 * basis.layers + 1) * FALLBACK_PASSES_PER_LAYER * basis.pass_s


FALLBACK = register(
    Technique(
        "fallback",
        900,
        _fallback,
        enabled=has_target,
        again=lambda c: True,
        fields=("max_degradation", "min_sqnr_db"),
        cost_key=lambda c: "fallback",
        estimate=_estimate,
        per_layer=True,
    )
)
