"""Plots for the HTML report, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Every function returns the PNG bytes of one small figure.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: a calibrator's color, the same in every plot (others cycle through the rest)
COLORS = {
    "minmax": "#d62728",
    "ema": "#ff7f0e",
    "percentile": "#2ca02c",
    "kl": "#1f77b4",
    "mse": "#9467bd",
    "auto_percentile": "#8c564b",
}
_OTHER = ("#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
DPI = 80


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _color(name: str, i: int) -> str:
    return COLORS.get(name, _OTHER[i % len(_OTHER)])


def _rebin(counts: np.ndarray, edges: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge adjacent bins down to at most ``bins`` (sums of counts), over the non-empty span."""
    nz = np.flatnonzero(counts)
    if nz.size:
        counts, edges = counts[nz[0] : nz[-1] + 1], edges[nz[0] : nz[-1] + 2]
    k = max(1, int(np.ceil(len(counts) / bins)))
    n = len(counts) // k * k
    if n < len(counts):  # pad the tail so it divides
        pad = k - (len(counts) - n)
        counts = np.concatenate([counts, np.zeros(pad)])
        step = edges[-1] - edges[-2]
        edges = np.concatenate([edges, edges[-1] + step * np.arange(1, pad + 1)])
    return counts.reshape(-1, k).sum(1), edges[::k]


def activation_histogram(
    counts: np.ndarray,
    edges: np.ndarray,
    ranges: dict[str, tuple[float, float]],
    chosen: tuple[float, float] | None,
    title: str,
    clipped: dict[str, float] | None = None,
    bins: int = 200,
) -> bytes:
    """Histogram of one activation (log counts) with each calibrator's range as a pair of
    vertical lines, and the range the quantized model uses shaded."""
    c, e = _rebin(np.asarray(counts, float), np.asarray(edges, float), bins)
    fig = Figure(figsize=(6.6, 2.6))
    ax = fig.add_subplot()
    ax.stairs(c, e, fill=True, color="#bbbbbb", label="_counts")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.8)
    if chosen is not None:
        ax.axvspan(chosen[0], chosen[1], color="#ffd54f", alpha=0.25, label="used range")
    for i, (name, (lo, hi)) in enumerate(ranges.items()):
        col = _color(name, i)
        label = name
        if clipped and name in clipped:
            label += f" ({100 * clipped[name]:.2g}% clipped)"
        ax.axvline(lo, color=col, lw=1.2, ls="--" if i % 2 else "-", label=label)
        ax.axvline(hi, color=col, lw=1.2, ls="--" if i % 2 else "-")
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("value", fontsize=7)
    ax.set_ylabel("count", fontsize=7)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.subplots_adjust(left=0.09, right=0.66, top=0.9, bottom=0.17)
    return _png(fig)


def weight_ranges(
    after: tuple[np.ndarray, np.ndarray],
    title: str,
    before: tuple[np.ndarray, np.ndarray] | None = None,
) -> bytes:
    """Per-output-channel weight range ``[min, max]`` as vertical bars; with ``before`` (the
    ranges before cross-layer equalization) drawn behind in grey."""
    lo, hi = (np.asarray(a, float) for a in after)
    x = np.arange(len(lo))
    fig = Figure(figsize=(5.6, 2.4))
    ax = fig.add_subplot()
    if before is not None:
        blo, bhi = (np.asarray(a, float) for a in before)
        ax.vlines(x, blo, bhi, color="#aaaaaa", lw=2.5, label="before CLE")
    ax.vlines(x, lo, hi, color="#1f77b4", lw=1.2, label="after CLE" if before is not None else "")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlim(-1, len(lo))
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("output channel", fontsize=7)
    ax.set_ylabel("weight", fontsize=7)
    ax.tick_params(labelsize=7)
    if before is not None:
        ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    return _png(fig)


def sqnr_bars(names: Sequence[str], sqnr_db: Sequence[float], title: str) -> bytes:
    """Horizontal bars of each layer's SQNR (dB), in network order; the lowest third in red."""
    vals = np.array([v if np.isfinite(v) else np.nan for v in sqnr_db], float)
    finite = vals[np.isfinite(vals)]
    cap = float(finite.max()) + 5 if finite.size else 60.0
    shown = np.where(np.isnan(vals), cap, vals)
    cut = np.nanpercentile(vals, 33) if finite.size else -np.inf
    colors = ["#d62728" if v <= cut else "#1f77b4" for v in shown]
    h = max(2.0, 0.16 * len(names) + 0.8)
    fig = Figure(figsize=(6.4, h))
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y, shown, color=colors)
    ax.set_yticks(y, [n if len(n) <= 40 else "…" + n[-39:] for n in names], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR (dB), higher is better", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return _png(fig)


def comparison_bars(methods: Sequence[str], values: Sequence[float], metric: str) -> bytes:
    """One bar per compared method (already sorted), value labelled."""
    h = max(2.0, 0.22 * len(methods) + 0.8)
    fig = Figure(figsize=(6.4, h))
    ax = fig.add_subplot()
    y = np.arange(len(methods))
    v = np.asarray(values, float)
    ax.barh(y, v, color="#2ca02c")
    lo = float(np.nanmin(v)) if v.size else 0.0
    hi = float(np.nanmax(v)) if v.size else 1.0
    ax.set_xlim(max(0.0, lo - 0.1 * (hi - lo + 1)), hi + 0.05 * (hi - lo + 1))
    for yi, vi in zip(y, v):
        ax.text(float(vi), float(yi), f" {vi:.2f}", va="center", fontsize=6)
    ax.set_yticks(y, list(methods), fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel(metric, fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return _png(fig)


__all__ = ["activation_histogram", "comparison_bars", "sqnr_bars", "weight_ranges"]
