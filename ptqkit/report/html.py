"""The HTML report: one self-contained file (inline CSS, plots embedded as base64 PNG, no script,
nothing fetched), readable offline.

:func:`~ptqkit.report.measure.collect` measures what the report shows on a quantized model (see
:mod:`ptqkit.report.measure`); :func:`render` turns a :class:`Report` into HTML;
:func:`write_report` does both and writes the file.
"""

from __future__ import annotations

import datetime
import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io.files import write_text
from . import plots
from .markup import CSS, embed_png, html_table
from .measure import Report, collect
from .range_coverage import section_coverage
from .recipe import section_recipe


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
    table = html_table(
        ["method", c.metric, "degradation", "agreement %", "KL", "quantize s", "error"],
        rows,
        "comparison",
    )
    ok = [r for r in c.rows if not r.error]
    fig = ""
    if ok:
        fig = embed_png(
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
        embed_png(plots.sqnr_bars(names, vals, "per-layer output SQNR"), "per-layer SQNR"),
    ]
    s = rep.sensitivity
    if s is not None and getattr(s, "layers", None):
        out.append(
            f"<p>Effect on the metric ({html.escape(s.metric)}; float {s.float_metric:.2f}, "
            f"quantized {s.quant_metric:.2f}) when only this layer is quantized / only this "
            "layer is left in float:</p>"
        )
        out.append(
            html_table(
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
            f"<figure>{embed_png(png, h.label)}<figcaption>{html.escape(h.name)}: "
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
            f"<figure>{embed_png(png, w.name)}<figcaption>{html.escape(w.name)}: "
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
        html_table(["", "value"], rep.summary, "summary"),
        "<h2>Advice</h2>",
        _section_advice(rep),
        "<h2>Recipe search</h2>",
        section_recipe(rep.recipe, rep.recipe_details),
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
        f"<title>{html.escape(rep.title)}</title><style>{CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def write_report(
    qmodel: nn.Module | None,
    path: str | Path,
    *,
    report: Report | None = None,
    **kwargs: Any,
) -> Report:
    """Write the HTML report of ``qmodel`` to ``path`` (keyword arguments: see :func:`collect`),
    or of an already collected ``report`` (``qmodel`` ``None``). Returns the :class:`Report` (its
    ``advice`` included). The model comes first, as in :func:`ptqkit.save` and
    :func:`ptqkit.export_onnx`."""
    if isinstance(qmodel, (str, Path)) and not isinstance(path, (str, Path)):
        raise TypeError("write_report(qmodel, path): the model comes first, then the path")
    if report is None:
        if qmodel is None:
            raise TypeError("write_report needs a quantized model or a collected report")
        report = collect(qmodel, **kwargs)
    elif kwargs:
        raise TypeError("pass either a report or collect() arguments, not both")
    path = write_text(path, render(report))  # atomic; SaveError naming path if it cannot
    report.path = path
    return report


__all__ = ["Report", "collect", "render", "write_report"]
