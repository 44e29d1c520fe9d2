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
from ..records import RangeFallback
from . import watch
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
        self.samples = watch.Pass()  # the outlier samples the pass's watches find

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


def range_fallbacks(
    calibrators: dict[str, Any], labels: dict[str, str]
) -> dict[str, RangeFallback]:
    """``{label: RangeFallback}`` of this pass's calibrators whose range the KL guard replaced:
    computed from the calibrators, never read back from ``info`` (what an earlier pass left
    there does not decide this pass's warning)."""
    out: dict[str, RangeFallback] = {}
    for qname, cal in calibrators.items():
        fb = getattr(cal, "fallback", None)
        if fb:
            out[labels.get(qname, qname)] = RangeFallback(
                {
                    "from": fb["from"],
                    "to": fb["to"],
                    "clipped_energy": float(fb["clipped_energy"]),
                    "channels": int(fb["channels"]),
                    "quantizer": qname,
                }
            )
    return out


def record(
    calibrators: dict[str, Any],
    labels: dict[str, str],
    info: PTQInfo,
    tracker: BatchMaxTracker | None = None,
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """Fill ``info.outliers`` and ``info.details["range_fallback"]`` (see the module docstring)
    from the calibrators of a finished pass (``compute_range`` already called; ``ranges``: the
    ranges they gave, to say truthfully whether an outlier was left out of its range)."""
    found = []
    fallbacks = range_fallbacks(calibrators, labels)
    if fallbacks:
        info.details.setdefault("range_fallback", {}).update(fallbacks)
    for qname, cal in calibrators.items():
        label = labels.get(qname, qname)
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
        reach = _reach(ranges, qname)
        info.outliers[label] = {
            "quantizer": qname,
            "kind": "values",
            "max": amax,
            "percentile": BULK_PERCENTILE,
            "q": float(q[c]),
            "ratio": r,
            "batch": batch,
            "range": reach,
            "left_out": reach is not None and reach <= OUTLIER_RATIO * float(q[c]),
        }
        found.append(describe(label, info.outliers[label]))
    if tracker is not None:
        found += _samples(tracker.samples.flags, info, ranges)
    if found:
        info.warn("the calibration data has outliers: " + "; ".join(found))
    if fallbacks:
        names = ", ".join(sorted(fallbacks))
        info.warn(f"the KL range clipped the body of the data at {names}; the MSE range is used")


def _reach(ranges: dict[str, Any] | None, qname: str) -> float | None:
    """``max(|lo|, |hi|)`` of the range quantizer ``qname`` was given (``None``: unknown)."""
    if not ranges or qname not in ranges:
        return None
    lo, hi = ranges[qname]
    return float(torch.maximum(lo.abs().max(), hi.abs().max()))


def _samples(flags: list[watch.Flag], info: PTQInfo, ranges: dict[str, Any] | None) -> list[str]:
    """Record the outlier samples (:mod:`ptqkit.calibrate.watch`), the worst per quantizer."""
    by_label: dict[str, list[watch.Flag]] = {}
    for f in flags:
        by_label.setdefault(f.label, []).append(f)
    out = []
    for label, fs in by_label.items():
        worst = max(fs, key=lambda f: f.ratio)
        info.outliers[label] = {
            "quantizer": worst.quantizer,
            "kind": "sample",
            "max": worst.max,
            "typical": worst.typical,
            "ratio": worst.ratio,
            "batch": worst.batch,
            "sample": worst.sample,
            "samples": [[f.batch, f.sample] for f in fs],
            "range": _reach(ranges, worst.quantizer),
            "left_out": all(f.left_out for f in fs),
        }
        out.append(describe(label, info.outliers[label]))
    return out


def describe(label: str, o: dict[str, Any]) -> str:
    """``"calibration batch 7 holds 1e+06 at x, 300,000× its 99.9th percentile (3.3); left out
    of its range"`` (or, for a sample: ``"calibration batch 7 (sample 5) holds 1e+06 at x,
    540× the median sample's max |x| (1.85); ..."``)."""
    where = f"calibration batch {o['batch']}" if o.get("batch") is not None else "the data"
    if o.get("kind") == "sample":
        more = len(o.get("samples", [])) - 1
        where += f" (sample {o['sample']}{f', and {more} more samples' if more > 0 else ''})"
        base = (
            f"{where} holds {o['max']:.3g} at {label}, {_times(o['ratio'])} the median "
            f"sample's max |x| ({o['typical']:.3g})"
        )
        if o.get("left_out"):
            return base + "; that sample is left out of the ranges of this and the later quantizers"
    else:
        base = (
            f"{where} holds {o['max']:.3g} at {label}, {_times(o['ratio'])} its "
            f"{o['percentile']:g}th percentile ({o['q']:.3g})"
        )
        if o.get("left_out"):
            return base + "; left out of its range"
    reach = f" (it reaches {o['range']:.3g})" if o.get("range") is not None else ""
    return (
        base + f"; NOT left out: its range spans it{reach}, so the ordinary values of this "
        "tensor get a coarse grid (minmax and ema take the observed extremes by definition: "
        "remove the sample, or use a histogram calibrator such as mse or percentile)"
    )


def _times(r: float) -> str:
    """``"540×"``, ``"300,000×"``, ``"5.4e+29×"``."""
    return f"{r:,.0f}×" if r < 1e7 else f"{r:.2g}×"
