"""Mergeable statistics of a stream of tensors. An observer only accumulates these; turning
them into a range is the job of a solver (:mod:`ptqkit.calibrate.solvers`).

Both statistics are per tensor (one channel) or per channel along an axis (``C`` channels):
the data of a batch is viewed as a ``[C, M]`` matrix.

:class:`MinMaxStats` keeps ``min`` and ``max``.

:class:`HistogramStats` keeps, per channel, ``n`` bins of width ``w = 2^e`` anchored at zero:
bin ``j`` counts the values in ``[(o + j)·w, (o + j + 1)·w)``. The exponent is a fixed function of
the observed range ``[lo, hi]``,

    ``e(lo, hi) = max(ceil(log2((hi - lo) / (n - 2))), -126)``,

which is monotone in the range, and ``o = floor(lo / w)``. When the range grows, bins are merged
exactly (``w`` doubles, ``j → floor((o + j) / 2^d) - o'``) instead of being reset or
interpolated. Hence the final histogram is **exactly** the histogram of all the data at the
final width, whatever the batch split or order (up to data in the float32 subnormal range), and
two histograms merge exactly. The data occupies between ``n/2`` and ``n`` bins. Exact zeros are
also counted apart (``zeros``), for solvers that must treat the ReLU zero spike specially.
"""

from __future__ import annotations

import torch

from ..errors import CalibrationError


def as_channels(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """View ``x`` as ``[C, M]``: one row per channel along ``axis``, or one row (per tensor)."""
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):  # ints, and half / bfloat16 (bincount
        x = x.float()  # and the bin arithmetic need float32 at least)
    if axis is None or x.dim() == 0:
        return x.reshape(1, -1)
    if not -x.dim() <= axis < x.dim():
        raise CalibrationError(
            f"channel axis {axis} out of range for a tensor of shape {tuple(x.shape)}"
        )
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _check_finite(lo: torch.Tensor, hi: torch.Tensor, who: str) -> None:
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise CalibrationError(
            f"{who}: the batch contains NaN or Inf values; quantization ranges need finite data "
            "(check the model inputs, or the layer that overflows)"
        )


class MinMaxStats:
    """Running ``lo = min(x)``, ``hi = max(x)`` per channel (``[C]`` float32 tensors)."""

    def __init__(self, axis: int | None = None, name: str = "minmax") -> None:
        self.axis = axis
        self.name = name
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.count = 0  # values seen per channel

    def update(self, x: torch.Tensor) -> None:
        xc = as_channels(x, self.axis)
        if xc.shape[1] == 0:
            return
        # not torch.aminmax(dim=1): its multi-threaded kernel takes ~16 ms on a 4x8 tensor
        # on a busy 2-core machine, where amin/amax take microseconds
        lo, hi = xc.amin(dim=1), xc.amax(dim=1)
        _check_finite(lo, hi, self.name)
        self._combine(lo.float(), hi.float(), xc.shape[1])

    def _combine(self, lo: torch.Tensor, hi: torch.Tensor, count: int) -> None:
        if self.lo is None:
            self.lo, self.hi = lo.clone(), hi.clone()
        else:
            if lo.shape != self.lo.shape:
                raise CalibrationError(
                    f"{self.name}: {lo.numel()} channels after {self.lo.numel()}; "
                    "a per-channel statistic needs the same channel count in every batch"
                )
            self.lo = torch.minimum(self.lo, lo.to(self.lo.device))
            self.hi = torch.maximum(self.hi, hi.to(self.hi.device))
        self.count += count

    def merge(self, other: MinMaxStats) -> None:
        if other.lo is not None:
            self._combine(other.lo, other.hi, other.count)


_MIN_EXP = -126


def _exponent(lo: torch.Tensor, hi: torch.Tensor, nbins: int) -> torch.Tensor:
    """``e(lo, hi)`` of the module docstring; for a single value ``v``: ``floor(log2|v|) - 40``."""
    lo64, hi64 = lo.double(), hi.double()
    span = hi64 - lo64
    e_span = torch.ceil(torch.log2(span.clamp_min(1e-300) / (nbins - 2)))
    mag = torch.maximum(lo64.abs(), hi64.abs()).clamp_min(1e-300)
    e_const = torch.floor(torch.log2(mag)) - 40
    e = torch.where(span > 0, e_span, e_const)
    return e.clamp_min(_MIN_EXP).to(torch.int64)


class HistogramStats:
    """Exactly mergeable per-channel histograms (see the module docstring)."""

    def __init__(self, bins: int = 4096, axis: int | None = None, name: str = "histogram") -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 8:
            raise CalibrationError(f"{name}: a histogram needs an int >= 8 bins, got {bins!r}")
        self.nbins = bins
        self.minmax = MinMaxStats(axis, name)
        self.axis = axis
        self.name = name
        self.counts: torch.Tensor | None = None  # [C, n] float64
        self.exp: torch.Tensor | None = None  # [C] int64, bin width 2^exp
        self.off: torch.Tensor | None = None  # [C] int64, global index of bin 0
        self.zeros: torch.Tensor | None = None  # [C] float64, exact zeros seen

    # -- views ------------------------------------------------------------------------------
    @property
    def lo(self) -> torch.Tensor | None:
        return self.minmax.lo

    @property
    def hi(self) -> torch.Tensor | None:
        return self.minmax.hi

    def width(self) -> torch.Tensor:
        """Bin width ``2^e`` per channel, float64."""
        return torch.ldexp(torch.ones_like(self.exp, dtype=torch.float64), self.exp)

    def edges(self) -> torch.Tensor:
        """``[C, n + 1]`` bin edges, float64."""
        j = torch.arange(self.nbins + 1, dtype=torch.float64, device=self.exp.device)
        return (self.off.double()[:, None] + j[None, :]) * self.width()[:, None]

    # -- accumulation -----------------------------------------------------------------------
    def _regrid(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New ``(exp, off)`` for the range ``[lo, hi]`` (never finer than the current grid)."""
        exp = _exponent(lo, hi, self.nbins)
        if self.exp is not None:
            exp = torch.maximum(exp, self.exp)
        w = torch.ldexp(torch.ones_like(lo, dtype=torch.float64), exp)
        off = torch.floor(lo.double() / w).to(torch.int64)
        return exp, off

    def _remap(
        self,
        counts: torch.Tensor,
        exp: torch.Tensor,
        off: torch.Tensor,
        new_exp: torch.Tensor,
        new_off: torch.Tensor,
    ) -> torch.Tensor:
        """Move ``counts`` from grid ``(exp, off)`` to the coarser grid ``(new_exp, new_off)``."""
        c, n = counts.shape
        j = torch.arange(n, device=counts.device, dtype=torch.float64)
        shift = torch.ldexp(torch.ones_like(exp, dtype=torch.float64), exp - new_exp)  # 2^-d
        glob = torch.floor((off.double()[:, None] + j[None, :]) * shift[:, None])
        pos = (glob - new_off.double()[:, None]).clamp(0, n - 1).to(torch.int64)
        pos = pos + torch.arange(c, device=counts.device)[:, None] * n
        out = torch.zeros(c * n, dtype=torch.float64, device=counts.device)
        out.index_add_(0, pos.reshape(-1), counts.reshape(-1))
        return out.reshape(c, n)

    def update(self, x: torch.Tensor) -> None:
        xc = as_channels(x, self.axis)
        if xc.shape[1] == 0:
            return
        self.minmax.update(x)  # checks finiteness, tracks the exact range
        exp, off = self._regrid(self.minmax.lo, self.minmax.hi)
        if self.counts is not None and (
            not torch.equal(exp, self.exp) or not torch.equal(off, self.off)
        ):
            self.counts = self._remap(self.counts, self.exp, self.off, exp, off)
        c = xc.shape[0]
        if self.counts is None:
            self.counts = torch.zeros(c, self.nbins, dtype=torch.float64, device=xc.device)
            self.zeros = torch.zeros(c, dtype=torch.float64, device=xc.device)
        self.exp, self.off = exp, off
        # x · 2^-e is exact in float32 (power-of-two scaling), and so is the subtraction below,
        # except when x · 2^-e falls below the normal range: its floor is then 0 or -1 by sign
        # alone, but a negative product may round to -0.0 (floor 0), hence the clamp
        # (in place, int32 indices: the hot loop of calibration)
        inv_w = torch.ldexp(torch.ones(c, device=xc.device), -exp.to(xc.device)).to(xc.dtype)
        idx = torch.mul(xc, inv_w[:, None]).floor_()
        if bool((self.minmax.lo < 0).any()):
            idx = torch.where(xc < 0, idx.clamp(max=-1), idx)
        idx.sub_(off.to(xc.dtype)[:, None]).clamp_(0, self.nbins - 1)
        if c == 1:
            flat = idx.reshape(-1).to(torch.int32)
        else:  # per channel: offset each row's bins (in int64, exact for any size)
            rows = torch.arange(c, device=xc.device)[:, None] * self.nbins
            flat = (idx.to(torch.int64) + rows).reshape(-1)
        self.counts += torch.bincount(flat, minlength=c * self.nbins).reshape(c, -1)
        self.zeros += (xc.shape[1] - torch.count_nonzero(xc, dim=1)).double()

    def merge(self, other: HistogramStats) -> None:
        if other.counts is None:
            return
        if other.nbins != self.nbins:
            raise CalibrationError(
                f"{self.name}: cannot merge {other.nbins} bins into {self.nbins}"
            )
        if self.counts is None:
            self.minmax.merge(other.minmax)
            self.counts, self.exp, self.off = other.counts.clone(), other.exp, other.off
            self.zeros = other.zeros.clone()
            return
        self.minmax.merge(other.minmax)
        exp, off = self._regrid(self.minmax.lo, self.minmax.hi)
        exp = torch.maximum(exp, other.exp)
        w = torch.ldexp(torch.ones_like(exp, dtype=torch.float64), exp)
        off = torch.floor(self.minmax.lo.double() / w).to(torch.int64)
        mine = self._remap(self.counts, self.exp, self.off, exp, off)
        theirs = self._remap(other.counts.to(mine.device), other.exp, other.off, exp, off)
        self.counts, self.exp, self.off = mine + theirs, exp, off
        self.zeros = self.zeros + other.zeros.to(self.zeros.device)

    # -- derived views for solvers -----------------------------------------------------------
    def folded(self, drop_zeros: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Histogram of ``|x|``: ``(counts [C, m], width [C])``, bin ``k`` = ``[k·w, (k+1)·w)``.

        Exact because bins are anchored at 0: global bin ``g < 0`` holds ``|x|`` in
        ``((-g-1)·w, -g·w]`` and maps to ``-g - 1``. With ``drop_zeros`` the exact zeros are
        removed from bin 0. Data far from 0 (``min |x| ≫ max x - min x``, a constant tensor)
        would need up to ``max|x| / w`` bins: there the folded bins are merged ``2^d`` at a time
        (still exact, the bins being anchored at 0) so that at most ``n`` of them are returned;
        ``width`` is then ``2^d · w``.
        """
        c, n = self.counts.shape
        glob = self.off[:, None] + torch.arange(n, device=self.counts.device)[None, :]
        fold = torch.where(glob < 0, -glob - 1, glob)
        used = torch.where(self.counts > 0, fold, torch.zeros_like(fold))
        top = used.max(dim=1).values  # [C] last non-empty folded bin
        d = torch.zeros_like(top)
        while bool(((top >> d) >= n).any()):  # at most ~64 rounds
            d = torch.where((top >> d) >= n, d + 1, d)
        m = int((top >> d).max()) + 1  # trailing empty bins are dropped
        k = (fold >> d[:, None]).clamp(max=m - 1)  # bins past ``top`` are empty
        out = torch.zeros(c, m, dtype=torch.float64, device=self.counts.device)
        out.scatter_add_(1, k, self.counts)
        if drop_zeros:
            out[:, 0] = (out[:, 0] - self.zeros).clamp_min(0)
        return out, torch.ldexp(self.width(), d)
