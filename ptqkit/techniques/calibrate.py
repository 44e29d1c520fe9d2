"""The calibration pass: one streaming float pass over the data, every activation quantizer's
statistics observed (:mod:`ptqkit.calibrate.session`) and every other technique's tap held
open, then the ranges solved by the chosen calibrator (min-max, EMA, percentile, KL, MSE,
adaptive percentile)."""

from __future__ import annotations

from ..stage import Context
from ..technique import Candidate, Technique, register


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
        ),
    )
)
