"""Range solvers: turn statistics (:mod:`ptqkit.calibrate.stats`) into a range ``(lo, hi)``.

All solvers are vectorized over the histogram (no Python loop over bins or thresholds) and return
float64 tensors of shape ``[C]``. Notation: histogram counts ``c_j`` at bin centers ``x_j``,
``N = Σ c_j``; ``Δ`` the grid step a range gives (:func:`ptqkit.quant.qparams`).

The histogram is log-scale (:mod:`ptqkit.calibrate.stats`). Every solver reads its bulk
(:func:`ptqkit.calibrate.bulk.bulk`: without the values beyond 100× the 99.9th percentile, which
exist in a channel only when it has outliers, at most 0.1 % of its values; ``lo`` and ``hi``
are then the bulk's). The MSE threshold search runs on
the log bins themselves (candidate thresholds 0.78 % apart at every scale); the two-sided
MSE search, defined on a uniform grid, runs on the bulk resampled to ``bins`` uniform bins
(:func:`ptqkit.calibrate.bulk.resample`). KL (entropy) calibration is in
:mod:`ptqkit.calibrate.entropy`; :func:`_one_sided` is the grid of its earlier variant.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import QuantSpec
from .bulk import HistView, bulk, quantile, resample, view
from .stats import HistogramStats, MinMaxStats

Range = tuple[torch.Tensor, torch.Tensor]


def minmax_range(stats: MinMaxStats) -> Range:
    """``(min x, max x)``."""
    lo, hi = stats.bounds()
    return lo.double(), hi.double()


def _levels(spec: QuantSpec) -> int:
    return spec.qmax - spec.qmin


def expected_error(
    h: HistogramStats | HistView, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Expected squared quantization error ``E(lo, hi)`` per channel over the histogram.

    ``E = Σ_{x_j outside} c_j (x_j - clamp(x_j, lo, hi))² + Σ_{|x_j| < Δ/2} c_j x_j²
    + N_round · Δ²/12``: clipping error at the bin centers outside the range; the values of the
    dead zone ``|x| < Δ/2`` round to 0, with error ``x²``; the other ``N_round`` values inside
    get uniform rounding noise ``Δ²/12``. Exact zeros are representable and carry no error.
    (Without the dead-zone term, a coarse grid over heavy tails, where most values round to 0
    with an error far below ``Δ²/12``, would be clipped much too hard.)
    """
    from ..quant.primitives import qparams

    scale, zp = qparams(lo.float(), hi.float(), spec)
    s, z = scale.double(), zp.double()
    a = (spec.qmin - z) * s  # the grid's real bounds
    b = (spec.qmax - z) * s
    h = view(h)
    edges = h.edges()
    x = 0.5 * (edges[:, :-1] + edges[:, 1:])
    c = h.counts
    clip = c * (x - torch.minimum(torch.maximum(x, a[:, None]), b[:, None])).pow(2)
    cz = _without_zeros(h)
    inside = (x >= a[:, None]) & (x <= b[:, None])
    dead = inside & (x.abs() < 0.5 * s[:, None])
    n_round = (cz * (inside & ~dead)).sum(1)
    return clip.sum(1) + (cz * dead * x * x).sum(1) + n_round * s.pow(2) / 12


def _without_zeros(h: HistView) -> torch.Tensor:
    """``counts`` with the exact zeros taken out of the bin ``[0, v_1)`` that holds them."""
    cz = h.counts.clone()
    cz.scatter_add_(1, h.zero_bin()[:, None].to(cz.device), -h.zeros[:, None])
    return cz.clamp_(min=0)


_quantile = quantile


def percentile_range(h: HistogramStats | HistView, spec: QuantSpec, percentile: float) -> Range:
    """Percentile range. Asymmetric: ``(Q(1 - p), Q(p))`` of ``x``; symmetric: ``±Q(p)`` of
    ``|x|``, over the bulk (outliers set aside); ``Q`` interpolates linearly inside a bin; the
    result never exceeds the observed ``[min, max]``."""
    p = percentile / 100.0
    h = bulk(h)
    lo_obs, hi_obs = h.lo.double(), h.hi.double()
    if spec.symmetric:
        folded, fedges = h.folded()
        t = _quantile(folded, fedges, p)
        t = torch.minimum(t, torch.maximum(-lo_obs, hi_obs))
        return _threshold_to_range(h, t, False)  # same grid as ±t, inside [min, max]
    edges = h.edges()
    lo = torch.minimum(torch.maximum(_quantile(h.counts, edges, 1.0 - p), lo_obs), hi_obs)
    hi = torch.minimum(torch.maximum(_quantile(h.counts, edges, p), lo_obs), hi_obs)
    return torch.minimum(lo, hi), torch.maximum(lo, hi)


def _one_sided_mask(h: HistView, spec: QuantSpec) -> torch.Tensor:
    """``[C]`` bool: the channel's data is one-sided (``x ≥ 0`` or ``x ≤ 0``), on an unsigned
    grid."""
    one = (h.lo >= 0) | (h.hi <= 0)
    return one & (not spec.symmetric)


def _one_sided(
    h: HistogramStats | HistView, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The uniform ``|x|`` histogram KL runs on: the bulk's ``|x|`` (exact zeros removed)
    resampled to ``3 · bins / 8`` (1536) bins of width ``w = max|x| / (3 · bins / 8)`` over the
    bulk (the previous, linear histogram gave KL between ``bins / 4`` and ``bins / 2`` bins of
    ``|x|``, depending on where the range fell between two powers of two: 3/8 is their middle, and
    KL's cost grows with the bins), and at least twice the grid levels; and,
    per channel, the number of grid levels that cover ``[0, T]`` and whether the data is
    one-sided on an unsigned grid (decided channel by channel, so that a per-channel range
    equals the per-tensor range of that channel). Returns ``(counts, w, levels, one_sided)``."""
    h = bulk(h)
    one_sided = _one_sided_mask(h, spec)
    full, half = _levels(spec), (_levels(spec) + 1) // 2
    levels = torch.where(one_sided, full, half)
    folded, fedges = h.folded(drop_zeros=True)
    nb = max(h.nbins * 3 // 8, 2 * (full + 1))  # more bins than levels, the same per channel
    # no value lies outside [min |x|, max |x|]: the bins that hold them are cut there
    amax = torch.maximum(h.lo.abs(), h.hi.abs())
    amin = torch.where(h.lo > 0, h.lo, torch.where(h.hi < 0, -h.hi, torch.zeros_like(h.lo)))
    fedges = torch.minimum(torch.maximum(fedges, amin[:, None]), amax[:, None])
    w = torch.where(amax > 0, amax / nb, torch.ones_like(amax))
    grid = torch.arange(nb + 1, dtype=torch.float64)
    f, e = folded.cpu().numpy(), fedges.cpu().numpy()
    rows = [resample(f[c], e[c], (grid * float(w[c])).numpy()) for c in range(f.shape[0])]
    uniform = torch.tensor(np.stack(rows), dtype=torch.float64, device=folded.device)
    return uniform, w, levels, one_sided


def _threshold_to_range(
    h: HistView, t: torch.Tensor, one_sided: torch.Tensor | bool
) -> Range:
    """``[0, T]`` (or ``[-T, 0]``) where ``one_sided``, else ``[lo, hi] ∩ [-T, T]``, kept
    non-empty when all the data lies beyond ``T`` on one side."""
    lo_obs, hi_obs = h.lo.double(), h.hi.double()
    neg = hi_obs <= 0
    zero = torch.zeros_like(t)
    one = torch.as_tensor(one_sided, device=t.device)
    lo1, hi1 = (
        torch.where(neg, torch.maximum(-t, lo_obs), zero),
        torch.where(neg, zero, torch.minimum(t, hi_obs)),
    )
    lo2 = torch.minimum(torch.maximum(lo_obs, -t), t)
    hi2 = torch.minimum(torch.maximum(hi_obs, -t), t)
    return torch.where(one, lo1, lo2), torch.where(one, hi1, hi2)


def _suffix(v: torch.Tensor) -> torch.Tensor:
    """``S_k = Σ_{j≥k} v_j`` with a trailing 0, along the last dim."""
    return torch.cat([v.flip(-1).cumsum(-1).flip(-1), torch.zeros_like(v[..., :1])], dim=-1)


def mse_range(
    h: HistogramStats | HistView, spec: QuantSpec, max_candidates: int = 256
) -> Range:
    """Range minimizing :func:`expected_error` (clipping + dead zone + ``Δ²/12`` rounding noise).

    Runs on the bulk (:func:`ptqkit.calibrate.bulk.bulk`).
    Symmetric or one-sided data: a 1-D search over thresholds ``T`` at the log-scale bin edges
    of ``|x|`` in ``[max|x| · 2^-12, max|x|]`` (:data:`MSE_SPAN_BINADES`; bins ``x_j`` at their
    centers), in closed form with suffix sums
    ``S_q = Σ_{x_j>T} c_j x_j^q`` and prefix sums ``D_q = Σ_{x_j<Δ/2} c_j x_j^q`` over the
    dead zone:
    ``E(T) = S_2 - 2T·S_1 + T²·S_0 + D_2 + (N - S_0 - D_0)·Δ²/12`` with ``Δ = T/L``, ``L`` the
    grid steps covering ``[0, T]`` (``2^(b-1) - 1`` signed, ``2^b - 1`` unsigned).
    Two-sided data on an unsigned grid: a 2-D search over ``(lo, hi)`` edge pairs of the bulk
    resampled to ``bins`` uniform bins anchored at 0 (subsampled to ``max_candidates`` per
    side), ``Δ = (hi - lo)/(2^b - 1)``. Per channel, each
    channel takes the search that fits its own data.
    """
    h = bulk(h)
    one = _one_sided_mask(h, spec)
    if spec.symmetric or bool(one.all()):
        return _mse_threshold(h, spec)
    lo, hi = _mse_two_sided(h, spec, max_candidates)
    if bool(one.any()):
        lo1, hi1 = _mse_threshold(h, spec)
        lo, hi = torch.where(one, lo1, lo), torch.where(one, hi1, hi)
    return lo, hi


#: the MSE threshold search spans the binades [max|x| · 2^-12, max|x|] (1,536 candidates): a
#: lower threshold would clip the top 0.1 % of the bulk (within 100× of its max, see
#: :mod:`ptqkit.calibrate.bulk`) by more than 40 times its own value
MSE_SPAN_BINADES = 12


def _mse_threshold(h: HistView, spec: QuantSpec) -> Range:
    """The 1-D threshold search of :func:`mse_range` (symmetric grid or one-sided data)."""
    one_sided = _one_sided_mask(h, spec)
    folded, edges = h.folded(drop_zeros=True)  # candidate thresholds: the bin edges t_k
    steps = spec.qmax if spec.symmetric else _levels(spec)  # Δ = T / steps, as in qparams
    x = 0.5 * (edges[:, :-1] + edges[:, 1:])
    full0, full2 = _suffix(folded), _suffix(folded * x * x)
    # candidates: the edges from max|x| · 2^-MSE_SPAN_BINADES up to the first edge >= max|x|
    amax = torch.maximum(h.lo.abs(), h.hi.abs()).to(edges.dtype)[:, None].contiguous()
    first = int(torch.searchsorted(edges, amax * 2.0**-MSE_SPAN_BINADES).min())
    last = int(torch.searchsorted(edges, amax).max()) + 1
    k = torch.arange(first, min(last, edges.shape[1]), device=edges.device)
    t, s0, s1, s2 = edges[:, k], full0[:, k], _suffix(folded * x)[:, k], full2[:, k]
    # bins whose center is below Δ/2 = T/(2L) round to 0: the first dz_k of them
    dz = torch.searchsorted(x.contiguous(), (t / (2 * steps)).contiguous())
    d0 = (full0[:, :1] - full0).gather(1, dz)  # prefix sums from the suffix sums
    d2 = (full2[:, :1] - full2).gather(1, dz)
    n = folded.sum(1, keepdim=True)
    err = s2 - 2 * t * s1 + t * t * s0 + d2 + (n - s0 - d0) * (t / steps).pow(2) / 12
    err[t <= 0] = float("inf")
    best = torch.argmin(err, dim=1)
    return _threshold_to_range(h, t.gather(1, best[:, None]).squeeze(1), one_sided)


def _uniform_signed(
    h: HistView, ch: int, log_edges: np.ndarray, log_counts: np.ndarray, nonzero: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Channel ``ch`` of the bulk on ``bins`` uniform bins anchored at 0 over ``[lo, hi]``:
    ``(edges, counts, counts without the exact zeros)``."""
    lo, hi = float(h.lo[ch]), float(h.hi[ch])
    u = (hi - lo) / max(h.nbins - 2, 1) if hi > lo else max(abs(lo), 1e-30) / h.nbins
    e = (np.floor(lo / u) + np.arange(h.nbins + 1)) * u
    log_edges = log_edges.clip(lo, hi)  # no value lies outside [lo, hi]
    return e, resample(log_counts, log_edges, e), resample(nonzero, log_edges, e)


def _mse_two_sided(h: HistView, spec: QuantSpec, k: int) -> Range:
    log_edges = h.edges().cpu().numpy()
    log_counts = h.counts.cpu().numpy()
    log_nonzero = _without_zeros(h).cpu().numpy()
    zeros = h.zeros.cpu().numpy()
    los, his = [], []
    for ch in range(log_counts.shape[0]):
        e, c, nonzero_ch = _uniform_signed(
            h, ch, log_edges[ch], log_counts[ch], log_nonzero[ch]
        )
        x = 0.5 * (e[:-1] + e[1:])
        pre = [np.concatenate([[0.0], np.cumsum(c * x**q)]) for q in range(3)]
        pz = [np.concatenate([[0.0], np.cumsum(nonzero_ch * x**q)]) for q in (0, 2)]
        li = np.flatnonzero(e <= 0)
        hi_ = np.flatnonzero(e >= 0)
        if li.size == 0 or hi_.size == 0:  # one-sided: mse_range solves it by thresholds
            los.append(e[0])
            his.append(e[-1])
            continue
        li = li[np.unique(np.linspace(0, len(li) - 1, min(k, len(li))).round().astype(int))]
        hi_ = hi_[np.unique(np.linspace(0, len(hi_) - 1, min(k, len(hi_))).round().astype(int))]
        a, b = e[li], e[hi_]
        # clipping: Σ_{x_j < a} c_j (x_j - a)²  and  Σ_{x_j > b} c_j (x_j - b)²
        lc = pre[2][li] - 2 * a * pre[1][li] + a * a * pre[0][li]
        r = [p[-1] - p[hi_] for p in pre]
        rc = r[2] - 2 * b * r[1] + b * b * r[0]
        n_in = np.maximum(c.sum() - zeros[ch] - pre[0][li][:, None] - r[0][None, :], 0)
        span = b[None, :] - a[:, None]
        delta = span / _levels(spec)
        # dead zone: the bins inside [a, b] whose center is within Δ/2 of 0 round to 0
        d_lo = np.maximum(np.searchsorted(x, -delta / 2, side="right"), li[:, None])
        d_hi = np.maximum(np.minimum(np.searchsorted(x, delta / 2), hi_[None, :]), d_lo)
        dead0, dead2 = (p[d_hi] - p[d_lo] for p in pz)
        n_round = np.maximum(n_in - dead0, 0)
        err = lc[:, None] + rc[None, :] + dead2 + n_round * delta**2 / 12
        err[span <= 0] = np.inf
        ia, ib = np.unravel_index(int(np.argmin(err)), err.shape)
        los.append(a[ia])
        his.append(b[ib])
    dev = h.lo.device
    lo = torch.maximum(torch.tensor(los, dtype=torch.float64, device=dev), h.lo.double())
    hi = torch.minimum(torch.tensor(his, dtype=torch.float64, device=dev), h.hi.double())
    return lo, hi


DEFAULT_PERCENTILES = (99.0, 99.5, 99.9, 99.95, 99.99, 99.995, 99.999, 99.9995, 99.9999, 100.0)


def auto_percentile_range(
    h: HistogramStats | HistView,
    spec: QuantSpec,
    candidates: tuple[float, ...] = DEFAULT_PERCENTILES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chapter's exercise 9.2.1: the percentile ``p*`` that minimizes
    :func:`expected_error` over the bulk among ``candidates``, per channel. Returns
    ``(lo, hi, p*)``."""
    h = bulk(h)
    los, his, errs = [], [], []
    for p in candidates:
        lo, hi = percentile_range(h, spec, p)
        los.append(lo)
        his.append(hi)
        errs.append(expected_error(h, lo, hi, spec))
    best = torch.argmin(torch.stack(errs), dim=0)
    pick = torch.arange(best.numel(), device=best.device)
    lo = torch.stack(los)[best, pick]
    hi = torch.stack(his)[best, pick]
    chosen = torch.tensor(candidates, dtype=torch.float64, device=best.device)[best]
    return lo, hi, chosen
