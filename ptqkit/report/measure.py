"""What the HTML report shows, measured on a quantized model (:func:`collect` → :class:`Report`;
:mod:`ptqkit.report.html` renders it).

What is measured (each on a few batches of the data, ``batches``):

* activation histograms: the float network the calibrators saw (after BN folding and CLE) runs
  with every activation quantizer observing one histogram, from which every registered
  calibrator's range is solved (histogram calibrators share it, the others observe alongside);
  the range the quantized model uses is drawn over it, with the fraction of values it clips;
* per-channel weight ranges of every layer, before and after cross-layer equalization when CLE
  ran and the float model is given;
* per-layer SQNR of each layer's output, quantized network vs float network
  (:func:`ptqkit.analysis.sensitivity.layer_sqnr`), unless a sensitivity report is passed;
* the fraction of held-out values outside each calibrated range (when ``eval_data`` is given).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..advice import Advice, advise, gather
from ..calibrate import CALIBRATORS, HistogramStats, make_calibrator
from ..calibrate.auto import read_from
from ..config import PTQConfig, QuantSpec
from ..info import PTQInfo
from ..quant.modules import act_quants, float_mode, quant_layers
from .summary import summary_rows

#: bins of the report's activation histograms (the calibrators' default, so ranges agree)
BINS = 4096


@dataclass
class Histogram:
    """One activation quantizer's calibration histogram and the ranges drawn on it."""

    name: str
    label: str
    counts: np.ndarray
    edges: np.ndarray
    ranges: dict[str, tuple[float, float]]
    clipped: dict[str, float]
    used: tuple[float, float] | None
    used_clipped: float
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class WeightRange:
    """Per-output-channel ``(min, max)`` of one layer's float weight (``before`` CLE if known)."""

    name: str
    kind: str
    after: tuple[np.ndarray, np.ndarray]
    before: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class Report:
    """Everything the report shows. Build it with :func:`collect`."""

    title: str = "ptqkit report"
    notes: list[str] = field(default_factory=list)
    summary: list[tuple[str, str]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    histograms: list[Histogram] = field(default_factory=list)
    histograms_total: int = 0
    histogram_samples: int = 0
    weights: list[WeightRange] = field(default_factory=list)
    weights_total: int = 0
    sqnr: dict[str, float] = field(default_factory=dict)
    sensitivity: Any = None
    comparison: Any = None
    advice: list[Advice] = field(default_factory=list)
    clipped: dict[str, float] = field(default_factory=dict)
    heldout_clipped: dict[str, float] = field(default_factory=dict)
    coverage: dict[str, Any] = field(default_factory=dict)  # EvalResult.coverage
    #: ``ptqkit.tune``'s choice in one line and its record (``ptq_info.details["recipe"]``)
    recipe: str = ""
    recipe_details: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


# -- activation histograms -----------------------------------------------------------------------
class _AllCalibrators:
    """Observes one tensor for every registered calibrator at the cost of one histogram: the
    histogram calibrators share it, min/max reads its range, the others observe themselves."""

    def __init__(self, label: str) -> None:
        self.hist = HistogramStats(BINS, None, label)
        self.cals: dict[str, Any] = {}
        self.own: list[Any] = []
        self.errors: dict[str, str] = {}
        for name in CALIBRATORS:
            try:
                cal = make_calibrator(name)
            except Exception as e:  # a user calibrator that needs arguments
                self.errors[name] = str(e)
                continue
            if not read_from(cal, self.hist, exact=True):
                self.own.append(cal)
            self.cals[name] = cal

    def observe(self, x: torch.Tensor) -> None:
        self.hist.update(x)
        for cal in self.own:
            cal.observe(x)

    def ranges(self, spec: QuantSpec) -> dict[str, tuple[float, float]]:
        out = {}
        for name, cal in self.cals.items():
            try:
                lo, hi = cal.compute_range(spec)
                out[name] = (float(lo), float(hi))
            except Exception as e:
                self.errors[name] = str(e).splitlines()[0] if str(e) else type(e).__name__
        return out


def _clipped(counts: np.ndarray, edges: np.ndarray, lo: float, hi: float, levels: int) -> float:
    """Fraction of the histogram's values clipped by ``[lo, hi]`` by more than rounding would
    move them: bin centers below ``lo - Δ/2`` or above ``hi + Δ/2`` (``Δ`` the grid step of the
    range on ``levels`` steps; at least one bin width, the histogram's resolution)."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    centers = 0.5 * (edges[:-1] + edges[1:])
    tol = max((hi - lo) / levels / 2, float(edges[1] - edges[0]))
    return float(counts[(centers < lo - tol) | (centers > hi + tol)].sum() / total)


def _observe(
    qmodel: nn.Module, data: Iterable[Any], observers: dict[str, Any], batches: int
) -> int:
    """Run ``batches`` batches of ``data`` through the float network of ``qmodel`` with
    ``observers`` on its activation quantizers (restored afterwards); returns the samples seen."""
    from ..calibrate.session import observe

    quants = act_quants(qmodel)
    config = getattr(qmodel, "ptq_config", None) or PTQConfig()
    config = config.replace(num_batches=batches, progress=False)
    try:
        with float_mode(qmodel), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, q in quants.items():
                if name in observers:
                    q.calibrator, q.mode = observers[name], "observe"
            info = PTQInfo()
            observe(qmodel, data, config, info, "report")
    finally:
        for q in quants.values():
            q.calibrator = None
    return info.calibration_samples


def activation_histograms(
    qmodel: nn.Module, data: Iterable[Any], batches: int = 2
) -> tuple[list[Histogram], int]:
    """Every activation quantizer's histogram on ``batches`` batches of ``data``, with every
    registered calibrator's range and the range ``qmodel`` uses (see the module docstring);
    and the number of samples they hold."""
    quants = act_quants(qmodel)
    obs = {n: _AllCalibrators(q.label or n) for n, q in quants.items()}
    samples = _observe(qmodel, data, obs, batches)
    out = []
    for name, q in quants.items():
        o = obs[name]
        if o.hist.counts is None:
            continue
        spec = q.spec if not q.spec.per_channel else QuantSpec(q.spec.bits, q.spec.symmetric)
        ranges = o.ranges(spec)
        levels = spec.qmax - spec.qmin
        counts = o.hist.counts[0].cpu().numpy()
        edges = o.hist.edges()[0].cpu().numpy()
        used = None
        if q.calibrated:
            lo, hi = (float(v) for v in q.range)
            used = (lo, hi)
        out.append(
            Histogram(
                name=name,
                label=q.label or name,
                counts=counts,
                edges=edges,
                ranges=ranges,
                clipped={k: _clipped(counts, edges, *r, levels) for k, r in ranges.items()},
                used=used,
                used_clipped=_clipped(counts, edges, *used, levels) if used else 0.0,
                errors=o.errors,
            )
        )
    return out, samples


class _Outside:
    """Counts the values outside ``[lo - s/2, hi + s/2]`` (off the quantizer's grid)."""

    def __init__(self, lo: float, hi: float, step: float) -> None:
        self.lo, self.hi = lo - step / 2, hi + step / 2
        self.n = self.out = 0

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.n += x.numel()
        self.out += int(((x < self.lo) | (x > self.hi)).sum())


def heldout_clipping(qmodel: nn.Module, data: Iterable[Any], batches: int = 2) -> dict[str, float]:
    """``{quantizer label: fraction of the values of data outside its calibrated range}``."""
    quants = {n: q for n, q in act_quants(qmodel).items() if q.calibrated}
    obs = {
        n: _Outside(float(q.range[0]), float(q.range[1]), float(q.scale.max()))
        for n, q in quants.items()
    }
    _observe(qmodel, data, obs, batches)
    return {quants[n].label or n: o.out / o.n for n, o in obs.items() if o.n}


def _pick(items: list, score: Sequence[float], k: int) -> list:
    """The ``k`` items of highest score, kept in their original order."""
    if len(items) <= k:
        return items
    keep = set(np.argsort(-np.asarray(score, float), kind="stable")[:k].tolist())
    return [it for i, it in enumerate(items) if i in keep]


def _disagreement(h: Histogram) -> float:
    widths = [hi - lo for lo, hi in h.ranges.values() if hi > lo]
    spread = max(widths) / min(widths) if widths else 1.0
    return spread + 100 * h.used_clipped


# -- weights -------------------------------------------------------------------------------------
def _kind(layer: nn.Module) -> str:
    name = type(layer).__name__
    groups = getattr(layer, "groups", 1)
    if groups > 1:
        name += " depthwise" if groups == getattr(layer, "in_channels", -1) else f" g={groups}"
    return name


def _channel_range(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    w2 = w.detach().float().reshape(w.shape[0], -1)
    return w2.amin(1).cpu().numpy(), w2.amax(1).cpu().numpy()


def weight_ranges(qmodel: nn.Module, model: nn.Module | None = None) -> list[WeightRange]:
    """Per-output-channel weight ranges of every layer of ``qmodel``; when CLE ran and the float
    ``model`` is given, also the ranges before CLE (``model`` prepared again, BN folded)."""
    before: dict[str, torch.Tensor] = {}
    info = getattr(qmodel, "ptq_info", None)
    config = getattr(qmodel, "ptq_config", None)
    cle_ran = bool(info is not None and (info.details.get("cle") or {}).get("pairs"))
    if model is not None and cle_ran and isinstance(config, PTQConfig):
        from ..capture import prepare

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = prepare(model, config.replace(progress=False), PTQInfo())
        before = {n: m.weight_fp for n, m in quant_layers(ref).items()}
    out = []
    for name, layer in quant_layers(qmodel).items():
        b = before.get(name)
        out.append(
            WeightRange(
                name=name,
                kind=_kind(layer.layer),
                after=_channel_range(layer.weight_fp),
                before=_channel_range(b)
                if b is not None and b.shape == layer.weight_fp.shape
                else None,
            )
        )
    return out


def _weight_score(w: WeightRange) -> float:
    ranges = [w.after] + ([w.before] if w.before is not None else [])
    score = 0.0
    for lo, hi in ranges:
        width = np.maximum(hi - lo, 0)
        med = float(np.median(width)) if width.size else 0.0
        score = max(score, float(width.max()) / med if med > 0 else 0.0)
    return score + (1000.0 if w.before is not None else 0.0)



def collect(
    qmodel: nn.Module,
    *,
    model: nn.Module | None = None,
    data: Iterable[Any] | None = None,
    eval_data: Iterable[Any] | None = None,
    result: Any = None,
    sensitivity: Any = None,
    comparison: Any = None,
    latency: dict[str, float] | None = None,
    advice: list[Advice] | None = None,
    title: str = "ptqkit report",
    notes: Sequence[str] = (),
    extra: Sequence[tuple[str, str]] = (),
    batches: int = 2,
    max_histograms: int = 24,
    max_weights: int = 24,
    evaluated_on_calibration_data: bool = False,
) -> Report:
    """Measure what the report shows (see the module docstring) on ``qmodel``.

    Args:
        qmodel: a model returned by :func:`ptqkit.quantize` (or :func:`ptqkit.load`).
        model: the float model (for the weight ranges before CLE).
        data: calibration batches (histograms, clipping); without data those sections are empty.
        eval_data: held-out batches (per-layer SQNR, held-out clipping); default ``data``.
        result: the :class:`~ptqkit.EvalResult` of the quantized model.
        sensitivity: a :class:`~ptqkit.analysis.sensitivity.SensitivityReport`, or a
            ``{layer: SQNR dB}`` dict; measured (SQNR only) when ``None`` and data is given.
        comparison: a :class:`~ptqkit.compare.Comparison`.
        latency: ``{what: milliseconds}``.
        advice: the advice to show; derived from the measurements when ``None``.
        title, notes, extra: heading, paragraphs under it, extra summary rows (first).
        batches: batches of data used by each measurement.
        max_histograms, max_weights: plots shown at most (those where the choice matters most:
            calibrators disagreeing, clipped values, unequal channel ranges).
        evaluated_on_calibration_data: ``result`` was measured on the calibration data.
    """
    rep = Report(title=title, notes=list(notes))
    info = getattr(qmodel, "ptq_info", None)
    rep.config = dict(info.config) if info is not None else {}
    rep.warnings = list(info.warnings) if info is not None else []
    if info is not None:
        rep.recipe, rep.recipe_details = info.recipe, dict(info.details.get("recipe", {}))
    rep.summary = list(extra) + summary_rows(qmodel, result, latency)
    rep.coverage = dict(getattr(result, "coverage", None) or {})
    if data is not None:
        hists, rep.histogram_samples = activation_histograms(qmodel, data, batches)
        rep.histograms_total = len(hists)
        rep.clipped = {h.label: h.used_clipped for h in hists if h.used is not None}
        rep.histograms = _pick(hists, [_disagreement(h) for h in hists], max_histograms)
        if eval_data is not None and eval_data is not data:
            rep.heldout_clipped = heldout_clipping(qmodel, eval_data, batches)
    ws = weight_ranges(qmodel, model)
    rep.weights_total = len(ws)
    rep.weights = _pick(ws, [_weight_score(w) for w in ws], max_weights)
    if isinstance(sensitivity, dict):
        rep.sqnr = dict(sensitivity)
    elif sensitivity is not None:
        rep.sensitivity = sensitivity
        rep.sqnr = {r.name: r.sqnr_db for r in sensitivity.layers}
    elif (src := eval_data if eval_data is not None else data) is not None:
        from ..analysis.sensitivity import layer_sqnr

        config = getattr(qmodel, "ptq_config", None) or PTQConfig()
        rep.sqnr = layer_sqnr(qmodel, src, config.replace(num_batches=batches, progress=False))
    rep.comparison = comparison
    if advice is None:
        facts = gather(
            qmodel,
            result,
            clipped=rep.clipped,
            heldout_clipped=rep.heldout_clipped,
            comparison=comparison,
            evaluated_on_calibration_data=evaluated_on_calibration_data,
        )
        advice = advise(facts)
    rep.advice = list(advice)
    return rep



__all__ = [
    "Histogram",
    "Report",
    "WeightRange",
    "activation_histograms",
    "collect",
    "heldout_clipping",
    "weight_ranges",
]
