"""The report's "Calibration coverage" section: how the evaluation values fit each calibrated
activation range (measured by :func:`ptqkit.evaluate`, see
:mod:`ptqkit.analysis.range_coverage`)."""

from __future__ import annotations

from typing import Any

from ..analysis.range_coverage import SATURATION_ENERGY, SATURATION_SHARE, Coverage
from .markup import html_table


def section_coverage(coverage: dict[str, Any], shown: int = 30) -> str:
    """An HTML table of the quantizers, worst first (``coverage``: ``EvalResult.coverage``)."""
    if not coverage:
        return (
            '<p class="muted">Not measured: the quantized model was not evaluated here (or has '
            "no ptqkit activation quantizers).</p>"
        )
    items = [(n, c if isinstance(c, Coverage) else Coverage(**c)) for n, c in coverage.items()]
    items.sort(key=lambda nc: (not nc[1].saturated, -nc[1].outside))
    rows = [
        [
            c.label or n,
            "saturated" if c.saturated else "ok",
            100 * c.outside,
            c.overshoot,
            c.clip_to_round,
            "yes" if c.model_input else "",
        ]
        for n, c in items[:shown]
    ]
    bad = sum(c.saturated for _, c in items)
    head = (
        f"<p>{bad} of {len(items)} activation quantizer(s) saturated by the evaluation data. "
        "A quantizer is saturated when more than "
        f"{100 * SATURATION_SHARE:g}% of its evaluation values fall outside its calibrated range "
        f"and their clipping error exceeds {SATURATION_ENERGY:g}x the rounding error "
        "(s²/12).</p>"
    )
    more = (
        f'<p class="muted">{len(items) - shown} more not shown.</p>' if len(items) > shown else ""
    )
    table = html_table(
        [
            "quantizer",
            "status",
            "% outside",
            "max overshoot (range widths)",
            "clipping / rounding error",
            "model input",
        ],
        rows,
        "coverage",
    )
    return head + table + more
