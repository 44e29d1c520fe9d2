"""Say when the calibration data has outliers, and where (layer and batch).

During the calibration pass, :class:`BatchMaxTracker` keeps, for every activation quantizer whose
calibrator holds a histogram, the batch at which its running ``max |x|`` last grew (cheap: two
0-d tensor ops per quantizer and batch, no device sync). After the pass, :func:`record` tests
each histogram with :func:`ptqkit.calibrate.bulk.outlier_ratio` (``max |x| / Q > 100``, ``Q`` the
99.9th percentile of the non-zero ``|x|``) and writes the findings to ``info.outliers``::

    {label: {"quantizer", "max", "percentile" (99.9), "q" (Q), "ratio", "batch"}}

(``batch`` is the index of the calibration batch that holds the maximum; under
``torch.distributed``, the batches of all ranks are numbered one after another in rank
order). It also records the ranges the KL guard replaced (``info.details["range_fallback"]``),
and emits one :class:`ptqkit.errors.PTQWarning` for all the outliers.
"""

from __future__ import annotations

from typing import Any

import torch

from ..info import PTQInfo
from .bulk import BULK_PERCENTILE, OUTLIER_RATIO, outlier_ratio, view
from .stats import HistogramStats


def _hist(cal: Any) -> HistogramStats | None:
    st = getattr(cal, "stats", None)
    return st if isinstance(st, HistogramStats) else None


def _amax(h: HistogramStats) -> torch.Tensor:
    lo, hi = h.minmax.bounds()
    return torch.maximum(lo.abs().amax(), hi.abs().amax())


class BatchMaxTracker:
    """The calibration batch at which each quantizer's running ``max |x|`` was reached."""

    def __init__(self, calibrators: dict[str, Any]) -> None:
        self.hists = {n: h for n, c in calibrators.items() if (h := _hist(c)) is not None}
        self.best: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, batch: int) -> None:
        """Call after batch ``batch`` went through the model."""
        for name, h in self.hists.items():
            if h.lo is None:
                continue
            m = _amax(h)
            if name not in self.best:
                self.best[name] = (m, torch.full_like(m, batch, dtype=torch.int64))
                continue
            prev, idx = self.best[name]
            grew = m > prev
            self.best[name] = (torch.where(grew, m, prev), torch.where(grew, batch, idx))

    def batch_of_max(self, name: str, h: HistogramStats) -> int | None:
        """The batch that holds ``h``'s max, if this tracker saw it (else ``None``)."""
        if name not in self.best:
            return None
        m, idx = self.best[name]
        return int(idx) if float(m) == float(_amax(h)) else None


def record(
    calibrators: dict[str, Any],
    labels: dict[str, str],
    info: PTQInfo,
    tracker: BatchMaxTracker | None = None,
) -> None:
    """Fill ``info.outliers`` and ``info.details["range_fallback"]`` (see the module docstring)
    from the calibrators of a finished pass (``compute_range`` already called)."""
    found = []
    for qname, cal in calibrators.items():
        label = labels.get(qname, qname)
        fb = getattr(cal, "fallback", None)
        if fb:
            info.details.setdefault("range_fallback", {})[label] = dict(fb, quantizer=qname)
        h = _hist(cal)
        if h is None or h.counts is None:
            continue
        ratio, q = outlier_ratio(view(h))
        c = int(torch.argmax(ratio))
        r = float(ratio[c])
        if r <= OUTLIER_RATIO:
            continue
        lo, hi = h.minmax.bounds()
        amax = float(max(abs(float(lo[c])), abs(float(hi[c]))))
        batch = tracker.batch_of_max(qname, h) if tracker is not None else None
        info.outliers[label] = {
            "quantizer": qname,
            "max": amax,
            "percentile": BULK_PERCENTILE,
            "q": float(q[c]),
            "ratio": r,
            "batch": batch,
        }
        found.append(describe(label, info.outliers[label]))
    if found:
        info.warn(
            "the calibration data has outliers (values far beyond the bulk of the data; the "
            "histogram calibrators leave them out of their ranges, minmax does not): "
            + "; ".join(found)
        )
    if info.details.get("range_fallback"):
        names = ", ".join(sorted(info.details["range_fallback"]))
        info.warn(f"the KL range clipped the body of the data at {names}; the MSE range is used")


def describe(label: str, o: dict[str, Any]) -> str:
    """``"calibration batch 7 holds 1e+06 at x, 300,000× its 99.9th percentile (3.3)"``."""
    where = f"calibration batch {o['batch']}" if o.get("batch") is not None else "the data"
    return (
        f"{where} holds {o['max']:.3g} at {label}, {o['ratio']:,.0f}× its "
        f"{o['percentile']:g}th percentile ({o['q']:.3g})"
    )
