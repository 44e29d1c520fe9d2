"""The HTML report: one self-contained file (inline CSS, plots embedded as base64 PNG, no script,
nothing fetched), readable offline.

:func:`collect` measures what the report shows on a quantized model; :func:`render` turns a
:class:`Report` into HTML; :func:`write_report` does both and writes the file.

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

import base64
import datetime
import html
import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..advice import Advice, advise, gather
from ..calibrate import CALIBRATORS, HistogramStats, MinMaxStats, make_calibrator
from ..config import PTQConfig, QuantSpec
from ..info import PTQInfo
from ..quant.modules import act_quants, float_mode, quant_layers
from . import plots

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
            stats = getattr(cal, "stats", None)
            if isinstance(stats, HistogramStats) and stats.nbins == BINS and stats.axis is None:
                cal.stats = self.hist
            elif isinstance(stats, MinMaxStats) and stats.axis is None:
                cal.stats = self.hist.minmax
            else:
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


# -- collecting ----------------------------------------------------------------------------------
def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _spec(d: dict[str, Any] | None) -> str:
    if not d:
        return "float (not quantized)"
    kind = "symmetric" if d.get("symmetric") else "asymmetric"
    gran = "per-channel" if d.get("per_channel") else "per-tensor"
    return f"{d.get('bits')}-bit {kind} {gran}"


def summary_rows(
    qmodel: nn.Module, result: Any = None, latency: dict[str, float] | None = None
) -> list[tuple[str, str]]:
    """The summary table's rows (label, value)."""
    rows: list[tuple[str, str]] = []
    if result is not None:
        unit = "%" if result.metric in ("top1", "top5", "agreement") else ""
        rows += [
            (f"FP32 {result.metric}", f"{result.fp32:.2f}{unit}"),
            (f"INT8 {result.metric}", f"{result.quantized:.2f}{unit}"),
            ("degradation", f"{result.degradation:+.2f} points"),
            ("top-1 agreement with FP32", f"{result.agreement:.2f}%"),
            ("KL(FP32 ‖ INT8) per sample", f"{result.kl:.4g} nats"),
            ("evaluation samples", str(result.samples)),
            ("size FP32", _fmt_bytes(result.size_bytes_fp32)),
            ("size quantized", _fmt_bytes(result.size_bytes_quantized)),
        ]
        if result.compression is not None:
            rows.append(("compression", f"{result.compression:.2f}×"))
    for k, v in (latency or {}).items():
        rows.append((f"latency {k}", f"{v:.2f} ms" if isinstance(v, float) else str(v)))
    info = getattr(qmodel, "ptq_info", None)
    if info is not None:
        c = info.config
        rows += [
            ("weights", _spec(c.get("weights"))),
            ("activations", _spec(c.get("activations"))),
            ("calibrator", str(c.get("calibration"))),
            ("CLE / bias correction", f"{c.get('cle')} / {c.get('bias_correction')}"),
            (
                "calibration samples",
                f"{info.calibration_samples} in {info.calibration_batches} batches",
            ),
            (
                "quantized layers / activation quantizers",
                f"{len(info.layers)} / {len(info.quantizers) - len(info.disabled)}",
            ),
        ]
        if info.skipped:
            rows.append(("layers left in float", ", ".join(info.skipped)))
        if info.stages:
            rows.append(
                ("time per stage", ", ".join(f"{k} {v:.2f} s" for k, v in info.stages.items()))
            )
    return rows


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
    elif data is not None or eval_data is not None:
        from ..analysis.sensitivity import layer_sqnr

        config = getattr(qmodel, "ptq_config", None) or PTQConfig()
        src = eval_data if eval_data is not None else data
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


# -- rendering -----------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1180px;
padding:16px 24px;color:#222;background:#fff}
h1{font-size:1.6em;margin-bottom:0}
h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:10px}.grid figure{margin:0;border:1px solid #eee;padding:4px}
figcaption{font-size:0.75em;color:#555;max-width:528px;word-break:break-all}
.warning{background:#fff4e5;border-left:4px solid #f0a020;padding:6px 10px;margin:6px 0}
.tip{background:#eef6ff;border-left:4px solid #3080e0;padding:6px 10px;margin:6px 0}
.practice{color:#666;font-size:0.85em}.muted{color:#777;font-size:0.85em}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:0.8em}
"""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]], id_: str = "") -> str:
    out = [f"<table{f' id={chr(34)}{id_}{chr(34)}' if id_ else ''}><thead><tr>"]
    out += [f"<th>{html.escape(str(h))}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for r in rows:
        cells = []
        for v in r:
            if isinstance(v, float):
                cells.append(
                    f'<td class="num">{v:.3g}</td>'
                    if abs(v) < 1e-2 and v
                    else f'<td class="num">{v:.2f}</td>'
                )
            elif isinstance(v, int) and not isinstance(v, bool):
                cells.append(f'<td class="num">{v}</td>')
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _section_advice(rep: Report) -> str:
    if not rep.advice:
        return "<p>No advice: every practice of the chapter that could be checked holds.</p>"
    parts = []
    for a in rep.advice:
        parts.append(
            f'<div class="{a.level}"><b>{html.escape(a.level)}</b> — {html.escape(a.message)}'
            f'<div class="practice">practice: {html.escape(a.practice)} (rule '
            f"<code>{html.escape(a.rule)}</code>)</div></div>"
        )
    return "".join(parts)


def _section_comparison(rep: Report) -> str:
    c = rep.comparison
    if c is None or not c.rows:
        return (
            '<p class="muted">Not run. Compare every calibrator, per-tensor vs per-channel, '
            "with and without CLE / bias correction: <code>ptqkit compare</code> or "
            "<code>--compare</code>.</p>"
        )
    rows = []
    for r in c.rows:
        if r.error:
            rows.append([r.method, "failed", "", "", "", f"{r.quantize_s:.2f}", r.error])
        else:
            rows.append([r.method, r.quantized, r.degradation, r.agreement, r.kl, r.quantize_s, ""])
    table = _table(
        ["method", c.metric, "degradation", "agreement %", "KL", "quantize s", "error"],
        rows,
        "comparison",
    )
    ok = [r for r in c.rows if not r.error]
    fig = ""
    if ok:
        fig = _img(
            plots.comparison_bars([r.method for r in ok], [r.quantized for r in ok], c.metric),
            "comparison",
        )
    return table + fig


def _section_sensitivity(rep: Report) -> str:
    if not rep.sqnr:
        return '<p class="muted">Not measured (no data given).</p>'
    names = list(rep.sqnr)
    vals = [rep.sqnr[n] for n in names]
    out = [
        "<p>SQNR of each layer's output in the quantized network against the float network "
        "(error accumulated from the input up to that layer); red: the lowest third.</p>",
        _img(plots.sqnr_bars(names, vals, "per-layer output SQNR"), "per-layer SQNR"),
    ]
    s = rep.sensitivity
    if s is not None and getattr(s, "layers", None):
        out.append(
            f"<p>Effect on the metric ({html.escape(s.metric)}; float {s.float_metric:.2f}, "
            f"quantized {s.quant_metric:.2f}) when only this layer is quantized / only this "
            "layer is left in float:</p>"
        )
        out.append(
            _table(
                ["layer", "kind", "params", "SQNR dB", "only quantized", "only float"],
                [
                    [r.name, r.kind, r.params, r.sqnr_db, r.only_quantized, r.only_float]
                    for r in s.layers
                ],
                "sensitivity",
            )
        )
    return "".join(out)


def _section_histograms(rep: Report) -> str:
    if not rep.histograms:
        return '<p class="muted">Not measured (no calibration data given).</p>'
    figs = []
    for h in rep.histograms:
        title = h.label if len(h.label) <= 70 else h.label[:67] + "..."
        png = plots.activation_histogram(h.counts, h.edges, h.ranges, h.used, title, h.clipped)
        used = (
            f"used range [{h.used[0]:.4g}, {h.used[1]:.4g}], clips {100 * h.used_clipped:.3g}%"
            if h.used
            else "left in float"
        )
        err = f"; not drawn: {', '.join(sorted(h.errors))}" if h.errors else ""
        figs.append(
            f"<figure>{_img(png, h.label)}<figcaption>{html.escape(h.name)}: "
            f"{html.escape(used)}{html.escape(err)}</figcaption></figure>"
        )
    shown = len(rep.histograms)
    head = (
        f"<p>Each activation's histogram on {rep.histogram_samples} samples of the calibration "
        "data (log scale) with the range every registered calibrator computes from them "
        "(vertical lines) and the range the quantized model uses (shaded; calibrated on all the "
        f"calibration data). {shown} of {rep.histograms_total} quantizers shown"
        + (
            ": those where the calibrators disagree most or values are clipped."
            if shown < rep.histograms_total
            else "."
        )
        + "</p>"
    )
    return head + '<div class="grid">' + "".join(figs) + "</div>"


def _section_weights(rep: Report) -> str:
    if not rep.weights:
        return '<p class="muted">No quantized layer.</p>'
    figs = []
    any_before = any(w.before is not None for w in rep.weights)
    for w in rep.weights:
        png = plots.weight_ranges(w.after, f"{w.name} ({w.kind})", w.before)
        lo, hi = w.after
        width = hi - lo
        ratio = float(width.max() / max(np.median(width), 1e-30)) if width.size else 1.0
        figs.append(
            f"<figure>{_img(png, w.name)}<figcaption>{html.escape(w.name)}: "
            f"{len(lo)} channels, widest/median channel range {ratio:.3g}</figcaption></figure>"
        )
    shown = len(rep.weights)
    head = (
        "<p>Range [min, max] of each output channel's float weights"
        + (" before (grey) and after (blue) cross-layer equalization" if any_before else "")
        + f". {shown} of {rep.weights_total} layers shown"
        + (": those with the most unequal channel ranges." if shown < rep.weights_total else ".")
        + "</p>"
    )
    return head + '<div class="grid">' + "".join(figs) + "</div>"


def render(rep: Report) -> str:
    """The report as one HTML document."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    from .. import __version__
    from .coverage import section_coverage

    notes = "".join(f"<p>{html.escape(n)}</p>" for n in rep.notes)
    warn = ""
    if rep.warnings:
        warn = (
            "<h2>Warnings during quantization</h2><ul>"
            + "".join(f"<li>{html.escape(w)}</li>" for w in rep.warnings)
            + "</ul>"
        )
    config = html.escape(json.dumps(rep.config, indent=1, default=str))
    body = [
        f"<h1>{html.escape(rep.title)}</h1>",
        f'<p class="muted">ptqkit {html.escape(__version__)} · torch '
        f"{html.escape(torch.__version__)} · {now}</p>",
        notes,
        "<h2>Summary</h2>",
        _table(["", "value"], rep.summary, "summary"),
        "<h2>Advice</h2>",
        _section_advice(rep),
        "<h2>Comparison of methods</h2>",
        _section_comparison(rep),
        "<h2>Per-layer sensitivity</h2>",
        _section_sensitivity(rep),
        "<h2>Calibration coverage of the evaluation data</h2>",
        section_coverage(rep.coverage),
        "<h2>Activation histograms and calibrator ranges</h2>",
        _section_histograms(rep),
        "<h2>Weight ranges per channel</h2>",
        _section_weights(rep),
        warn,
        "<h2>Configuration</h2>",
        f"<pre>{config}</pre>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(rep.title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def write_report(
    path: str | Path,
    qmodel: nn.Module | None = None,
    *,
    report: Report | None = None,
    **kwargs: Any,
) -> Report:
    """Write the HTML report of ``qmodel`` to ``path`` (keyword arguments: see :func:`collect`),
    or of an already collected ``report``. Returns the :class:`Report` (its ``advice`` included).
    """
    if report is None:
        if qmodel is None:
            raise TypeError("write_report needs a quantized model or a collected report")
        report = collect(qmodel, **kwargs)
    elif kwargs:
        raise TypeError("pass either a report or collect() arguments, not both")
    path = Path(path)
    path.write_text(render(report), encoding="utf-8")
    report.path = path
    return report


__all__ = [
    "Histogram",
    "Report",
    "WeightRange",
    "activation_histograms",
    "collect",
    "heldout_clipping",
    "render",
    "summary_rows",
    "weight_ranges",
    "write_report",
]
