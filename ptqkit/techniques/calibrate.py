"""The calibration pass: one streaming float pass over the data, every activation quantizer's
statistics observed (:mod:`ptqkit.calibrate.session`) and every other technique's tap held
open, then the ranges solved by the chosen calibrator (min-max, EMA, percentile, KL, MSE,
adaptive percentile).

For :func:`ptqkit.tune` it offers the calibrators (``mse``, ``percentile``) and, where the
model's work is in ``nn.Linear`` layers (:data:`LINEAR_SHARE`), the alternative to calibrating:
``"dynamic activations"``, each Linear's input quantized per token at run time (static
per-tensor ranges lose the tokens of small magnitude to one outlier channel; a scale per row
follows each token). Its cost is a trial's own (no stage of its own: no ranges to solve for
those layers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import PTQConfig, QuantSpec, Scope
from ..stage import Context
from ..technique import Candidate, ModelView, Technique, register

#: the least share of the quantized layers' multiply-adds done by ``nn.Linear`` layers for
#: which dynamic activations are offered (transformers, MLPs; not a CNN's classifier)
LINEAR_SHARE = 0.5


def dynamic_not_applicable(view: ModelView, config: PTQConfig) -> str | None:
    """Why dynamic per-token activations on the Linear layers are not offered (``None``: they
    are): the activations are not quantized or already dynamic, or Linear layers do less than
    :data:`LINEAR_SHARE` of the model's work (the dynamic form is for Linears only; a CNN's
    classifier is not worth a run-time scale per row)."""
    a = config.activations
    if a is None:
        return "the activations are not quantized (weight-only)"
    if a.dynamic or any(sc.activations is not None for sc in config.scopes):
        return "the activations are already dynamic (model-wide or in a scope)"
    linear = [lv.name for lv in view.layers if lv.linear and lv.rows]
    if not linear:
        return "no quantized nn.Linear was reached by the calibration data"
    share = view.linear_share()
    if share < LINEAR_SHARE:
        return (
            f"the quantized nn.Linear layers ({', '.join(linear[:3])}"
            f"{', ...' if len(linear) > 3 else ''}) do {100 * share:.1f}% of the multiply-adds "
            f"(under {100 * LINEAR_SHARE:.0f}%): dynamic activations are for models whose work "
            "is in Linear layers"
        )
    return None


def dynamic_linears(config: PTQConfig) -> Mapping[str, Any]:
    """One more scope: every ``nn.Linear`` quantizes its input per row (token) at run time,
    ``QuantSpec(bits, symmetric as the static spec, per_channel=True, dynamic=True)``; the
    other activation quantizers stay static (:mod:`ptqkit.capture.placement`)."""
    from torch import nn

    a = config.activations
    assert a is not None  # dynamic_not_applicable
    spec = QuantSpec(bits=a.bits, symmetric=a.symmetric, per_channel=True, dynamic=True)
    return {"scopes": (*config.scopes, Scope(nn.Linear, activations=spec))}


def _calibrate(ctx: Context) -> None:
    from ..calibrate.session import calibrate
    from ..technique import tapping
    from . import pipeline

    with tapping(pipeline(), ctx):
        ctx.calibrators = calibrate(
            ctx.qmodel, ctx.data, ctx.config, ctx.info, channels_last_inputs=ctx.channels_last
        )


CALIBRATE = register(
    Technique(
        "calibrate",
        400,
        _calibrate,
        phase="calibrate",
        # the calibrator (``calibration``, ``calibrator_options``) only solves: a prefix serves
        # every one that reads its histograms (ptqkit.recipe.prefix.servable)
        fields=("num_batches",),
        candidates=(
            Candidate("mse", {"calibration": "mse"}, rank=10),
            Candidate("percentile", {"calibration": "percentile"}, rank=30),
            Candidate(
                "dynamic activations",
                rank=15,
                applies=dynamic_not_applicable,
                changes_for=dynamic_linears,
            ),
        ),
    )
)
