"""``calibration="auto"``: per activation quantizer, the candidate ranges of several
calibrators scored by the error they cause downstream on a few batches
(:mod:`ptqkit.calibrate.auto`)."""

from __future__ import annotations

from ..stage import Context
from ..technique import Candidate, Technique, register


def _auto(ctx: Context) -> None:
    from ..calibrate.auto import choose_ranges

    if ctx.calibrators:
        choose_ranges(ctx.qmodel, ctx.data, ctx.calibrators, ctx.config, ctx.info)


AUTO = register(
    Technique(
        "auto",
        500,
        _auto,
        enabled=lambda c: c.calibration == "auto",
        again=lambda c: True,
        fields=("calibration",),
        cost_key=lambda c: "auto",
        prior_passes={"auto": 3.0},
        candidates=(Candidate("auto", {"calibration": "auto"}, rank=100),),
    )
)
