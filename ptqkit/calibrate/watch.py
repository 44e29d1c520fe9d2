"""Outlier *samples* in the calibration data: found at every activation quantizer, left out of
the robust calibrators' statistics, named (quantizer, batch, sample) in ``ptq_info``.

One corrupt input sample (a pixel of 1e6, a sensor glitch) reaches every later layer, and
there it is no longer a few values but a whole region of the sample's activation (a 3×3 conv
spreads one pixel over 9 positions × every channel, the next one over 25, a Linear over the
whole row), with magnitudes anywhere between the bulk and the glitch: a value-level test
(:mod:`ptqkit.calibrate.bulk`) cannot separate them from the data. A sample-level test can.

During the calibration pass every quantizer's calibrator is wrapped in a :class:`Watch`. For
each tensor ``x`` whose first dimension is the batch's (``N`` samples), it takes each sample's
``m_s = max |x_s|`` and the reference ``r = median`` of ``m`` over the samples seen so far
(those kept, and this batch's). Sample ``s`` is an **outlier sample** at that quantizer when

    ``m_s > R · r``  with ``R = 100`` (:data:`SAMPLE_RATIO`),

the same factor as the value-level test: the largest of 1,437 digits lies 1.0× above the
median sample's max at the input, 1.9× at the logits; 100× is a sample from elsewhere.
A sample found at one quantizer is left out of every quantizer after it in that forward (they
see the same corrupt sample) by the **robust** calibrators: those that hold a histogram
(percentile, kl, mse, auto_percentile, and ``"auto"``) observe ``x`` without its rows.
``minmax`` and ``ema`` are the observed extremes by definition: they keep the sample, and the
warning says so (their range then spans it). Until :data:`MIN_REFERENCE` samples have been
seen there is no reference: the first batches are held (copies of at most that many samples)
and decided when it is reached, so a corrupt first sample is found too.

Non-finite values (NaN, Inf) are refused with :class:`ptqkit.errors.NonFiniteDataError`
naming the quantizer, the batch and the sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import NonFiniteDataError
from .stats import HistogramStats, memory_rows

#: ``max |x_s|`` beyond this many times the median sample's makes ``s`` an outlier sample
SAMPLE_RATIO = 100.0
#: samples needed before the median is a reference (the first batches are held until then)
MIN_REFERENCE = 8


@dataclass
class Flag:
    """One outlier sample at one quantizer."""

    quantizer: str
    label: str
    batch: int
    sample: int  # index inside its batch
    max: float  # max |x| of the sample there
    typical: float  # the median sample's max |x| there
    left_out: bool  # whether the quantizer's statistics were kept free of it

    @property
    def ratio(self) -> float:
        return self.max / self.typical if self.typical > 0 else float("inf")


@dataclass
class Pass:
    """What the watches of one calibration pass share: the current batch, its samples left out,
    and every flag raised."""

    batch: int = -1
    size: int = 0
    excluded: dict[int, set[int]] = field(default_factory=dict)  # batch -> samples
    flags: list[Flag] = field(default_factory=list)

    def start(self, batch: int, size: int) -> None:
        self.batch, self.size = batch, size


def robust(cal: Any) -> bool:
    """Whether ``cal`` leaves outlier samples out (it holds a histogram): minmax / ema do not."""
    return isinstance(getattr(cal, "stats", None), HistogramStats)


class Extremes:
    """Per-sample ``min`` and ``max`` of a batch's tensor, and ``m = max |x_s|`` (float32)."""

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.lo, self.hi = lo, hi
        self.m = torch.maximum(hi, -lo).float()


class Watch:
    """Wraps one quantizer's calibrator for one pass (see the module docstring)."""

    def __init__(self, inner: Any, name: str, label: str, shared: Pass) -> None:
        self.inner, self.name, self.label, self.shared = inner, name, label, shared
        self.robust = robust(inner)
        self.history: list[torch.Tensor] = []  # per-sample max |x| of the samples kept
        self.seen = 0
        self.pending: list[tuple[int, torch.Tensor, Extremes]] = []  # (batch, x, extremes)
        # a per-tensor calibrator that takes the extremes of x with it (no second read of x)
        bounded = getattr(inner, "observe_bounded", None)
        self.bounded = bounded if getattr(inner, "axis", None) is None else None

    # the calibrator protocol, for whoever reads it during the pass
    def __getattr__(self, item: str) -> Any:
        return getattr(self.__dict__["inner"], item)

    def _refuse(self, where: str) -> None:
        raise NonFiniteDataError(
            f"calibration batch {self.shared.batch}{where} holds NaN or Inf "
            "values; quantization ranges need finite data (check that sample of the input, or "
            "the layer before this quantizer, which overflows)"
        )

    def observe(self, x: torch.Tensor) -> None:
        xd = x.detach()
        n = self.shared.size
        if xd.dim() == 0 or xd.shape[0] != n or xd.numel() == 0 or self._axis0(xd):
            if not bool(torch.isfinite(xd.amax()) & torch.isfinite(xd.amin())):
                self._refuse("")
            self._flush()
            self.inner.observe(x)
            return
        rows = memory_rows(xd, n)  # (a view of a channels-last tensor, no copy)
        ext = Extremes(rows.amin(1), rows.amax(1))
        finite = torch.isfinite(ext.m)
        if not bool(finite.all()):
            self._refuse(f", sample {int((~finite).nonzero()[0])} of it,")
        if self.pending or self.seen + n < MIN_REFERENCE:
            self.pending.append((self.shared.batch, xd.clone(), ext))
            self.seen += n
            if self.seen >= MIN_REFERENCE:
                self._flush()
            return
        self.seen += n
        self._decide(self.shared.batch, x, ext)

    def _axis0(self, x: torch.Tensor) -> bool:
        axis = getattr(self.inner, "axis", None)
        return axis is not None and axis % x.dim() == 0  # channels on the batch axis

    def _flush(self) -> None:
        """Decide the held batches (the reference is reached, or the pass ended)."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        ref = self._reference([e.m for _, _, e in pending])
        for batch, x, e in pending:
            self._decide(batch, x, e, ref)

    def _reference(self, extra: list[torch.Tensor]) -> float:
        """The median sample's max |x| over the samples kept so far and ``extra``."""
        return float(torch.cat([h.reshape(-1).cpu() for h in [*self.history, *extra]]).median())

    def _decide(self, batch: int, x: torch.Tensor, ext: Extremes, ref: float = -1.0) -> None:
        m = ext.m
        if ref < 0:
            ref = self._reference([m])
        bad = (m > SAMPLE_RATIO * ref) if ref > 0 else torch.zeros_like(m, dtype=torch.bool)
        out = self.shared.excluded.setdefault(batch, set())
        for s in bad.nonzero().reshape(-1).tolist():
            if s not in out:
                self.shared.flags.append(
                    Flag(self.name, self.label, batch, s, float(m[s]), ref, self.robust)
                )
        if self.robust:
            out.update(bad.nonzero().reshape(-1).tolist())
        keep = torch.ones_like(bad)
        if self.robust and out:
            keep[sorted(i for i in out if i < keep.numel())] = False
        if bool(keep.all()):
            self._observe(x, ext.lo, ext.hi)
            self.history.append(m)
        elif bool(keep.any()):
            k = keep.to(x.device)
            self._observe(x[k], ext.lo[k], ext.hi[k])
            self.history.append(m[keep])

    def _observe(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """The calibrator observes ``x``, whose samples' extremes are ``lo``/``hi``."""
        if self.bounded is not None:
            self.bounded(x, lo.min().reshape(1), hi.max().reshape(1))
        else:
            self.inner.observe(x)

    def finish(self) -> Any:
        """Decide what is still held; returns the calibrator this watch wrapped."""
        self._flush()
        return self.inner


def wrap(quants: dict[str, Any], shared: Pass) -> None:
    """Wrap the calibrator of every quantizer of ``quants`` (name -> ActQuant) in a Watch."""
    for name, q in quants.items():
        q.calibrator = Watch(q.calibrator, name, q.label or name, shared)


def unwrap(quants: dict[str, Any]) -> None:
    """Undo :func:`wrap`, after the held batches are decided."""
    for q in quants.values():
        if isinstance(q.calibrator, Watch):
            q.calibrator = q.calibrator.finish()


__all__ = ["MIN_REFERENCE", "SAMPLE_RATIO", "Flag", "Pass", "Watch", "robust", "unwrap", "wrap"]
