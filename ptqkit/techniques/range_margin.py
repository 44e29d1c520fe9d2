"""``range_margin``: every activation range widened by a fraction of its width, for data that
may go beyond the calibration data's (:mod:`ptqkit.calibrate.margin`)."""

from __future__ import annotations

from ..stage import Context
from ..technique import Technique, register


def _range_margin(ctx: Context) -> None:
    from ..calibrate.margin import widen_ranges

    widen_ranges(ctx.qmodel, ctx.config.range_margin, ctx.info)


RANGE_MARGIN = register(
    Technique(
        "range_margin",
        600,
        _range_margin,
        enabled=lambda c: c.range_margin > 0,
        fields=("range_margin",),
    )
)
