"""The bulk of a tensor's values, its outliers, and the views of a histogram the solvers use.

Outliers. Let ``Q`` be the high quantile of the non-zero ``|x|`` that leaves
``max(1e-3 · N, 2)`` values above it (the 99.9th percentile for ``N ≥ 2,000`` values; for
fewer, at least two values lie above ``Q``, so that one value alone never sets it). A channel
**has outliers** when

    ``ratio = max |x| / Q > 100``  (:data:`OUTLIER_RATIO`).

Over 200,000 values, Gaussian data gives ``ratio ≈ 1.5``, Laplace ``≈ 1.7``, ReLU'd Gaussian
``≈ 1.4``; a Student-t with 2 degrees of freedom (infinite variance, its max grows like
``√N``) ``≈ 30``, 52 in one draw of the tests, hence 100 rather than 50: a ratio of 100 is
beyond the tail of real activations and means a few values (at most ``1e-3`` of the data)
that do not belong to the distribution of the rest: a corrupt sample, a sensor glitch, a rare
massive-activation token.
The share is ``1e-3`` rather than ``1e-4`` because one corrupt input sample reaches every value
of its row in the layers after the input: 1/640 of an MLP's hidden tensor for 640 calibration
samples, half of it after a ReLU. Outliers present in more than 0.1 % of the values (a
systematic massive-activation channel) are part of the data and stay.

The **bulk** is the histogram without the magnitude bins whose lower edge lies beyond
``100 · Q`` (:func:`bulk`); every histogram solver runs on it. One value of 1e6 has a squared
error of 1e12 whatever the range below it, which would otherwise outweigh the error of 40,960
ordinary values and drag the MSE range to it; it would also set the top of the uniform grid KL
works on. At most ``1e-3`` of the data is set aside, and only in a channel where the ratio test
fires.

Uniform grids. TensorRT's KL calibration (and the two-sided MSE search) is defined on a uniform
grid (TensorRT: 2048 bins over ``[0, max |x|]``); :func:`resample` maps the log-scale bins
onto one by linear interpolation of the cumulative count ``F`` (the density is taken as uniform
inside a log bin, whose width is 0.78 % of its value): ``c'_k = F(u_{k+1}) - F(u_k)``.
The grid covers the bulk only, so its resolution does not depend on the outlier either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .stats import HistogramStats

#: ``max |x| / Q`` above which a channel has outliers (``Q`` as in the module docstring)
OUTLIER_RATIO = 100.0
#: share of the non-zero values above the bulk quantile ``Q`` (its percentile: 99.9)
BULK_TAIL = 1e-3
#: the percentile ``Q`` is, for messages
BULK_PERCENTILE = 100.0 * (1.0 - BULK_TAIL)


def quantile(counts: torch.Tensor, edges: torch.Tensor, frac: torch.Tensor | float) -> torch.Tensor:
    """``[C]`` value below which a fraction ``frac`` (scalar or ``[C]``) of the counts lies,
    interpolated linearly inside a bin."""
    cum = torch.cumsum(counts, dim=1)
    frac = torch.as_tensor(frac, dtype=cum.dtype, device=cum.device).reshape(-1, 1)
    target = (frac * cum[:, -1:]).contiguous()
    j = torch.searchsorted(cum, target).clamp(max=counts.shape[1] - 1)  # first bin reaching it
    before = torch.where(j > 0, cum.gather(1, (j - 1).clamp_min(0)), torch.zeros_like(target))
    inbin = counts.gather(1, j).clamp_min(1e-300)
    t = ((target - before) / inbin).clamp(0, 1)
    left, right = edges.gather(1, j), edges.gather(1, j + 1)
    return (left + t * (right - left)).squeeze(1)


def bulk_quantile(h: HistView) -> torch.Tensor:
    """``Q`` of the module docstring, ``[C]`` float64 (0 for a channel of zeros only)."""
    folded, edges = h.folded(drop_zeros=True)
    n = folded.sum(1)
    tail = torch.maximum(torch.full_like(n, BULK_TAIL), 2.0 / n.clamp_min(1.0))
    q = quantile(folded, edges, (1.0 - tail).clamp_min(0.5))
    return torch.where(n > 0, q, torch.zeros_like(q))


def outlier_ratio(h: HistView) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ratio, Q)`` per channel: ``max |x| / Q`` (0 where ``Q = 0``) and ``Q``."""
    q = bulk_quantile(h)
    amax = torch.maximum(h.lo.double().abs(), h.hi.double().abs())
    return torch.where(q > 0, amax / q.clamp_min(1e-300), torch.zeros_like(q)), q


@dataclass
class HistView:
    """A histogram with the layout of :class:`~ptqkit.calibrate.stats.HistogramStats` (signed
    order, ``n`` magnitude bins per sign) and its observed range: what the solvers read."""

    counts: torch.Tensor  # [C, 2n]
    medges: torch.Tensor  # [C, n + 1] magnitude edges
    zeros: torch.Tensor  # [C]
    lo: torch.Tensor  # [C]
    hi: torch.Tensor  # [C]
    nbins: int
    is_bulk: bool = False  # already without its outliers (bulk() returns it as it is)

    def magnitude_edges(self) -> torch.Tensor:
        return self.medges

    def edges(self) -> torch.Tensor:
        return torch.cat([-self.medges[:, 1:].flip(1), self.medges], dim=1)

    def zero_bin(self) -> torch.Tensor:
        n = self.medges.shape[1] - 1
        return torch.full_like(self.zeros, n, dtype=torch.int64)

    def folded(self, drop_zeros: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.medges.shape[1] - 1
        out = self.counts[:, n:] + self.counts[:, :n].flip(1)
        if drop_zeros:
            out = out.clone()
            out[:, 0] = (out[:, 0] - self.zeros).clamp_min(0)
        return out, self.medges


def view(h: HistogramStats | HistView) -> HistView:
    """The :class:`HistView` of a :class:`~ptqkit.calibrate.stats.HistogramStats` (no copy)."""
    if isinstance(h, HistView):
        return h
    counts, _, zeros = h.state()
    lo, hi = h.minmax.bounds()
    return HistView(counts, h.magnitude_edges(), zeros, lo.double(), hi.double(), h.nbins)


def bulk(h: HistogramStats | HistView) -> HistView:
    """The histogram without its outliers (see the module docstring): the magnitude bins whose
    lower edge exceeds ``100 · Q`` are emptied and the range shrinks to the kept bins."""
    v = view(h)
    if v.is_bulk:
        return v
    ratio, q = outlier_ratio(v)
    has = ratio > OUTLIER_RATIO
    if not bool(has.any()):
        return HistView(v.counts, v.medges, v.zeros, v.lo, v.hi, v.nbins, True)
    n = v.medges.shape[1] - 1
    cap = torch.where(has, OUTLIER_RATIO * q, torch.full_like(q, float("inf")))
    keep = v.medges[:, :-1] <= cap[:, None]  # [C, n] magnitude bins kept
    counts = v.counts * torch.cat([keep.flip(1), keep], dim=1)
    upper = v.medges[:, 1:]
    pos = (counts[:, n:] > 0) & keep
    neg = (counts[:, :n].flip(1) > 0) & keep
    top_pos = torch.where(pos, upper, torch.zeros_like(upper)).amax(1)
    top_neg = torch.where(neg, upper, torch.zeros_like(upper)).amax(1)
    hi = torch.where(v.hi > cap, torch.minimum(top_pos, v.hi), v.hi)
    lo = torch.where(v.lo < -cap, torch.maximum(-top_neg, v.lo), v.lo)
    return HistView(counts, v.medges, v.zeros, torch.minimum(lo, hi), hi, v.nbins, True)


def resample(counts: np.ndarray, edges: np.ndarray, new_edges: np.ndarray) -> np.ndarray:
    """Counts of ``counts`` (on ``edges``) over ``new_edges``: ``F(u_{k+1}) - F(u_k)`` with
    ``F`` the cumulative count, linear inside a bin (zero-width bins are empty)."""
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    return np.diff(np.interp(new_edges, edges, cum)).clip(min=0.0)


def clipped_energy(
    h: HistogramStats | HistView, lo: torch.Tensor, hi: torch.Tensor
) -> torch.Tensor:
    """``Σ c_j (x_j - clamp(x_j, lo, hi))² / Σ c_j x_j²`` over the **body** ``|x_j| ≤ Q``
    (``Q`` of the module docstring, bins at their centers, exact zeros left out): the share of
    the energy of the 99.9 % body of the data that clipping to ``[lo, hi]`` turns into error.
    Clipping the tail is what KL is for; cutting into the body is a collapse of the range."""
    v = view(h)
    q = bulk_quantile(v)
    e = v.edges()
    x = 0.5 * (e[:, :-1] + e[:, 1:])
    c = v.counts.clone()
    c.scatter_add_(1, v.zero_bin()[:, None], -v.zeros[:, None])
    c = c.clamp_(min=0) * (x.abs() <= q[:, None])
    clip = (x - torch.minimum(torch.maximum(x, lo.double()[:, None]), hi.double()[:, None])) ** 2
    total = (c * x * x).sum(1)
    share = (c * clip).sum(1) / total.clamp_min(1e-300)
    return torch.where(total > 0, share, torch.zeros_like(total))
