"""Mergeable statistics of a stream of tensors. An observer only accumulates these; turning
them into a range is the job of a solver (:mod:`ptqkit.calibrate.solvers`).

Both statistics are per tensor (one channel) or per channel along an axis (``C`` channels):
the data of a batch is viewed as a ``[C, M]`` matrix.

:class:`MinMaxStats` keeps ``min`` and ``max``.

:class:`HistogramStats` is a log-scale histogram (the idea of HDR histograms and of DDSketch,
Masson et al., VLDB 2019) whose bins are a fixed function of the float32 bit pattern of ``|x|``:

    ``key(x) = bits(|x|) >> (23 - m)``  (the 8 exponent bits and the top ``m`` mantissa bits),

``m = 7`` (:data:`MANTISSA_BITS`). ``key`` is monotone in ``|x|`` (IEEE-754 orders non-negative
floats like their bit patterns), and a key covers ``[v_k, v_{k+1})`` with
``v_k = float(k << (23 - m))``, so every bin is ``2^-m = 0.78 %`` of its value wide, near zero
as near the maximum: **the resolution does not depend on the largest value**, and an outlier of
1e6 among N(0, 1) data leaves the bins of the ordinary values untouched.

Bounded memory: per channel, the bins cover a window of :data:`BINADES` = 32 binades (factors of
two) below the binade of ``max |x|``: ``n = 32 · 2^m = 4096`` bins per sign, ``2n = 8192``
bins of 8 bytes = **64 KiB per tensor** (per channel: 64 KiB per channel). The window's top
is ``top = (E + 1) · 2^m`` with ``E`` the exponent field of ``max |x|``; magnitude bin ``j``
holds key ``top - n + j`` and bin 0 also holds every smaller key (the values below
``max |x| · 2^-32``, exact zeros included). ``counts`` is stored in signed order: the negative
bins mirrored (``-|x|``), then the positive ones, ``2n`` bins with edges
``[-v_top, ..., -v_{top-n+1}, 0, v_{top-n+1}, ..., v_top]``.

Exactness: the bin of a value depends only on the value and on ``top``, a monotone function of
the running maximum; when ``top`` grows by ``d`` keys, magnitude bin ``j`` moves to
``max(j - d, 0)`` (merging the bins that leave the window into bin 0, exactly). Hence the final
state is **exactly** the histogram of all the data at the final window, whatever the batch split
or order, and two states merge exactly (align both windows to the larger ``top``, add). Exact
zeros are also counted apart (``zeros``), for solvers that must treat the ReLU zero spike
specially. ``-0.0`` is counted as ``+0.0``.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import CalibrationError


def memory_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` as ``[n, M]`` rows along its first axis, each row's values in memory order: a view,
    not a copy, when ``x`` is dense with its first axis outermost in another order than the
    default (channels-last activations), for statistics that do not depend on the order."""
    if x.dim() < 3 or x.is_contiguous():
        return x.reshape(n, -1)
    strides = x.stride()
    order = [0, *sorted(range(1, x.dim()), key=lambda d: -strides[d])]
    p = x.permute(order)
    return p.reshape(n, -1) if p.is_contiguous() else x.reshape(n, -1)


def as_channels(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """View ``x`` as ``[C, M]``: one row per channel along ``axis``, or one row (per tensor,
    in memory order: :func:`memory_rows`)."""
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):  # ints, and half / bfloat16 (bincount
        x = x.float()  # and the bin arithmetic need float32 at least)
    if axis is None or x.dim() == 0:
        return memory_rows(x, 1)
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

    def update(
        self, x: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        """Add ``x``; ``bounds``: its per-channel ``(min, max)`` (``[C]``) when the caller has
        them already (the outlier watch's per-sample extremes): no second read of ``x``."""
        xc = as_channels(x, self.axis)
        if xc.shape[1] == 0:
            return
        if bounds is not None:
            lo, hi = bounds[0].reshape(-1), bounds[1].reshape(-1)
        else:
            # not torch.aminmax(dim=1): its multi-threaded kernel takes ~16 ms on a 4x8 tensor
            # on a busy 2-core machine, where amin/amax take microseconds
            lo, hi = xc.amin(dim=1), xc.amax(dim=1)
        _check_finite(lo, hi, self.name)
        self._combine(lo.float(), hi.float(), xc.shape[1])

    def _combine(self, lo: torch.Tensor, hi: torch.Tensor, count: int) -> None:
        if self.lo is None or self.hi is None:
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
        if other.lo is not None and other.hi is not None:
            self._combine(other.lo, other.hi, other.count)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)``; raises :class:`CalibrationError` before any data was seen."""
        if self.lo is None or self.hi is None:
            raise CalibrationError(f"{self.name}: no data observed")
        return self.lo, self.hi


#: mantissa bits kept in a bin key: relative bin width 2^-7 = 0.78 %
MANTISSA_BITS = 7
#: binades (factors of 2) the window covers below the binade of max |x|
BINADES = 32
_SUB = 1 << MANTISSA_BITS
_N = BINADES * _SUB  # magnitude bins per sign
_SHIFT = 23 - MANTISSA_BITS
_MAX_TOP = 255 << MANTISSA_BITS  # first key of inf / nan


def key_value(keys: torch.Tensor) -> torch.Tensor:
    """``v_k``: the smallest float32 of key ``k`` (``0`` for ``k <= 0``), as float64."""
    bits = (keys.clamp(0, _MAX_TOP).to(torch.int32) << _SHIFT).contiguous()
    return bits.view(torch.float32).double()


def _top(amax: torch.Tensor) -> torch.Tensor:
    """``top`` (exclusive key bound of the window) for ``max |x|`` (float), int64 ``[C]``."""
    bits = amax.float().contiguous().view(torch.int32).to(torch.int64)
    return (((bits >> 23) + 1) << MANTISSA_BITS).clamp(min=_N, max=_MAX_TOP)


_LITTLE_ENDIAN = sys.byteorder == "little"


def _count_rows(xc: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """``[C, 2n]`` counts of the rows of ``xc`` on the windows ``top`` (any ``C``)."""
    c = xc.shape[0]
    # in place on one int32 copy: x + 0.0 turns -0.0 into +0.0; the sign bit (>> 31: -1 or 0)
    # mirrors a negative magnitude bin j to -j - 1 (xor)
    bits = (xc.float() + 0.0).view(torch.int32)
    flip = bits >> 31
    base = (top - _N).to(device=xc.device, dtype=torch.int32)[:, None]
    key = bits.bitwise_and_(0x7FFFFFFF).bitwise_right_shift_(_SHIFT)
    key.sub_(base).clamp_(0, _N - 1).bitwise_xor_(flip).add_(_N)
    if c == 1:
        flat = key.reshape(-1)
    else:  # per channel: offset each row's bins (in int64, exact for any size)
        rows = torch.arange(c, device=xc.device)[:, None] * (2 * _N)
        flat = (key.to(torch.int64) + rows).reshape(-1)
    return torch.bincount(flat, minlength=c * 2 * _N).reshape(c, -1).double()


#: values below which one thread counts (the split's overhead is not worth it)
_SPLIT_MIN = 1 << 20
_POOL: list[ThreadPoolExecutor] = []


def _counted(keys: torch.Tensor, bins: int) -> torch.Tensor:
    """``torch.bincount`` of ``keys`` (any integer dtype: ``bincount`` has no ``uint16``
    kernel, so those are widened to ``int32`` first)."""
    if keys.dtype not in (torch.int32, torch.int64):
        keys = keys.to(torch.int32)
    return torch.bincount(keys, minlength=bins)


def _bincount(keys: torch.Tensor, bins: int) -> torch.Tensor:
    """``torch.bincount(keys, minlength=bins)`` of a 1-D ``keys``, split over
    ``torch.get_num_threads()`` threads on the CPU: its counting loop is serial (one core of two
    idle during calibration's histograms), and ``bincount`` releases the GIL; each thread also
    widens its own part of ``keys`` (a strided ``uint16`` view: 37 vs 53 ms per 12.8M values,
    2 threads, against one widening copy first). Integer counts: the same result exactly."""
    t = torch.get_num_threads()
    if t < 2 or keys.device.type != "cpu" or keys.numel() < _SPLIT_MIN:
        return _counted(keys, bins)
    if not _POOL or _POOL[0]._max_workers < t - 1:
        _POOL[:] = [ThreadPoolExecutor(t - 1, thread_name_prefix="ptqkit-bincount")]
    first, *rest = keys.chunk(t)
    futures = [_POOL[0].submit(_counted, p, bins) for p in rest]
    h = _counted(first, bins)
    for f in futures:
        h += f.result()
    return h


def _count_keys16(xc: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The counts of :func:`_count_rows` for one row (per tensor), from one conversion pass
    over ``x`` instead of eight in-place integer passes. The top 16 bits of a float32 are its
    sign and its key (``bits >> 16``, :data:`MANTISSA_BITS` = 7): read as the upper ``uint16``
    half of each value (a strided view, no arithmetic), they are counted over all 65,536
    sign/key pairs, and the window (keys below ``top - n`` into bin 0) is applied to those
    65,536 counts. Also returns the number of zeros, read off the same counts: the values of
    key 0, ``|x| < 2^-133`` (exact zeros, ``-0.0``, and the subnormals below ``9.2e-41``, which
    every grid rounds to 0: scales are at least ``1e-10``), all counted as ``+0.0``. The same
    counts as :func:`_count_rows` exactly but for those subnormals, and no second pass over
    ``x`` to count its zeros (``count_nonzero`` cost as much as the histogram: 1.7 s of a 19.7 s
    EfficientNet-Lite0 default calibration)."""
    xf = (xc if xc.dtype == torch.float32 else xc.float()).contiguous()
    half = 1 << 15
    keys = xf.reshape(-1).view(torch.uint16)[1::2]  # (a strided view: no copy)
    h = _bincount(keys, 2 * half).double()
    base = int(top.reshape(-1)[0]) - _N
    j = (torch.arange(half, dtype=torch.int64, device=h.device) - base).clamp_(0, _N - 1)
    row = torch.zeros(2 * _N, dtype=torch.float64, device=h.device)
    row.index_add_(0, _N + j, h[:half])
    row.index_add_(0, _N - 1 - j, h[half:])
    # key 0 of either sign (|x| < 2^-133, -0.0 included) is +0.0: a zero
    row[_N - 1] -= h[half]
    row[_N] += h[half]
    return row[None, :], h[0] + h[half]


class HistogramStats:
    """Exactly mergeable per-channel log-scale histograms (see the module docstring).

    ``bins`` does not change the stored state (always ``2n = 8192`` bins); it is the resolution
    of the uniform grids the solvers that need one (KL, the two-sided MSE search) resample to:
    ``bins / 2`` over ``[0, max |x|]`` (kl; ``3 · bins / 8`` for kl_log), ``bins`` over
    ``[min, max]``.
    """

    def __init__(self, bins: int = 4096, axis: int | None = None, name: str = "histogram") -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 8:
            raise CalibrationError(f"{name}: a histogram needs an int >= 8 bins, got {bins!r}")
        self.nbins = bins
        self.minmax = MinMaxStats(axis, name)
        self.axis = axis
        self.name = name
        self.counts: torch.Tensor | None = None  # [C, 2n] float64, signed order
        self.top: torch.Tensor | None = None  # [C] int64, exclusive top key of the window
        self.zeros: torch.Tensor | None = None  # [C] float64, exact zeros seen

    # -- views ------------------------------------------------------------------------------
    def state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(counts, top, zeros)``; raises :class:`CalibrationError` before any data was seen."""
        if self.counts is None or self.top is None or self.zeros is None:
            raise CalibrationError(f"{self.name}: no data observed")
        return self.counts, self.top, self.zeros

    @property
    def lo(self) -> torch.Tensor | None:
        return self.minmax.lo

    @property
    def hi(self) -> torch.Tensor | None:
        return self.minmax.hi

    def magnitude_edges(self) -> torch.Tensor:
        """``[C, n + 1]`` edges of the magnitude bins: ``0, v_{top-n+1}, ..., v_top``."""
        top = self.state()[1]
        j = torch.arange(1, _N + 1, device=top.device)
        v = key_value(top[:, None] - _N + j[None, :])
        return torch.cat([torch.zeros_like(v[:, :1]), v], dim=1)

    def edges(self) -> torch.Tensor:
        """``[C, 2n + 1]`` edges of ``counts`` (signed order), float64."""
        m = self.magnitude_edges()
        return torch.cat([-m[:, 1:].flip(1), m], dim=1)

    def zero_bin(self) -> torch.Tensor:
        """``[C]`` index (in ``counts``) of the bin that holds the exact zeros."""
        return _N + (-(self.state()[1] - _N)).clamp(0, _N - 1)

    def folded(self, drop_zeros: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Histogram of ``|x|``: ``(counts [C, n], edges [C, n + 1])``, exact (the negative
        bins are the mirrored positive ones). ``drop_zeros`` removes the exact zeros."""
        counts, _, zeros = self.state()
        out = counts[:, _N:] + counts[:, :_N].flip(1)
        if drop_zeros:
            j0 = (self.zero_bin() - _N)[:, None]
            out = out.clone()
            out.scatter_add_(1, j0, -zeros[:, None])
            out.clamp_(min=0)
        return out, self.magnitude_edges()

    # -- accumulation -----------------------------------------------------------------------
    def _shift(
        self, counts: torch.Tensor, top: torch.Tensor, new_top: torch.Tensor
    ) -> torch.Tensor:
        """``counts`` on the window ``top`` moved to the window ``new_top >= top``."""
        d = (new_top - top).to(counts.device)
        if not bool((d != 0).any()):
            return counts
        j = torch.arange(_N, device=counts.device)
        nj = (j[None, :] - d[:, None]).clamp_min(0)  # magnitude bin j -> nj
        index = torch.cat([(_N - 1 - nj).flip(1), _N + nj], dim=1)
        out = torch.zeros_like(counts)
        out.scatter_add_(1, index, counts)
        return out

    def update(
        self, x: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        """Add ``x`` (``bounds``: its per-channel ``(min, max)``, :meth:`MinMaxStats.update`)."""
        xc = as_channels(x, self.axis)
        if xc.shape[1] == 0:
            return
        self.minmax.update(x, bounds)  # checks finiteness, tracks the exact range
        lo, hi = self.minmax.bounds()
        top = _top(torch.maximum(lo.abs(), hi.abs()))
        c = xc.shape[0]
        if self.counts is None or self.top is None or self.zeros is None:
            counts = torch.zeros(c, 2 * _N, dtype=torch.float64, device=xc.device)
            zeros = torch.zeros(c, dtype=torch.float64, device=xc.device)
        else:
            top = torch.maximum(top, self.top)
            counts, zeros = self._shift(self.counts, self.top, top), self.zeros
        self.top = top
        if c == 1 and _LITTLE_ENDIAN:
            new, zero_count = _count_keys16(xc, top)
            zeros += zero_count
        else:
            new = _count_rows(xc, top)
            zeros += (xc.shape[1] - torch.count_nonzero(xc, dim=1)).double()
        counts += new
        self.counts, self.zeros = counts, zeros

    def merge(self, other: HistogramStats) -> None:
        if other.counts is None:
            return
        if other.nbins != self.nbins:
            raise CalibrationError(
                f"{self.name}: cannot merge {other.nbins} bins into {self.nbins}"
            )
        self.minmax.merge(other.minmax)
        o_counts, o_top, o_zeros = other.state()
        if self.counts is None:
            self.counts, self.top, self.zeros = o_counts.clone(), o_top.clone(), o_zeros.clone()
            return
        counts, my_top, zeros = self.state()
        theirs_top = o_top.to(my_top.device)
        top = torch.maximum(my_top, theirs_top)
        mine = self._shift(counts, my_top, top)
        theirs = self._shift(o_counts.to(mine.device), theirs_top, top)
        self.counts, self.top = mine + theirs, top
        self.zeros = zeros + o_zeros.to(zeros.device)
