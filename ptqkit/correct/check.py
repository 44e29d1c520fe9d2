"""The check every data-driven bias correction passes before it is written: on the rows it was
fitted on, the corrected layer must not be further from the float layer than the uncorrected
one.

Per calibration sample ``s`` (its sampled output positions ``p``, every channel ``c``; the
pairs of :class:`ptqkit.correct.affine.Paired`), with ``ỹ`` the quantized output, ``y`` the
float one, and the correction ``ỹ ← a·ỹ + δ`` (``a = 1`` for plain bias correction):

    ``E0_s = Σ_{p,c} (ỹ - y)²``,      ``E1_s = Σ_{p,c} (a·ỹ + δ - y)²``.

The correction is **kept** when it does not raise the layer's error, ``mean_s E1 ≤ mean_s E0``
(up to float rounding, :data:`RTOL`), *and* the typical sample's does not rise by more than
:data:`TRIM_SLACK` = 2 %: ``T1 ≤ 1.02 · T0``, ``T`` the mean over the samples without the
:data:`TRIM` = 10 % of largest ``max(E0_s, E1_s)`` (a trimmed mean, the same samples on both
sides; the slack because a correction that lowers the mean may move the typical sample by a
fraction of a percent either way: 0.207 -> 0.208 on a clean 4-bit net of the tests).
A mean-matching correction
always lowers the plain mean on the data it was fitted on (by ``δ²``), so the mean alone would
accept anything; the trimmed mean is what a corrupt sample cannot move: one sample of 1e30
makes ``δ ≈ 1e27`` lower its own error and raise every other sample's. (The median alone
is too noisy: on a clean 4-bit net it rejected corrections that lowered both means.) A
rejected layer keeps its uncorrected bias; the errors are recorded (:class:`LayerCheck`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..sync import active, exchange
from .affine import Paired

#: share of the samples (the largest errors) the trimmed mean leaves out
TRIM = 0.1
#: relative tolerance of the comparisons (float rounding of a correction of ~0)
RTOL = 1e-6
#: how much a kept correction may raise the trimmed mean (a corrupt sample raises it 1e6-fold)
TRIM_SLACK = 0.02


@dataclass(frozen=True)
class LayerCheck:
    """One layer's check: per-sample squared error against the float output, without and with
    the correction (median and mean over ``samples`` samples), and whether it was kept."""

    kept: bool
    samples: int
    trimmed_before: float
    trimmed_after: float
    mean_before: float
    mean_after: float
    median_before: float
    median_after: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _errors(paired: Paired, delta: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``[S, 2]``: per sample, ``E0_s`` and ``E1_s`` (see the module docstring)."""
    d = delta.detach().double().cpu().reshape(1, 1, -1)
    a = None if scale is None else scale.detach().double().cpu().reshape(1, 1, -1)
    out = []
    for q, y in paired.rows:
        q64, y64 = q.double(), y.double()
        e0 = (q64 - y64).pow(2).sum((1, 2))
        fixed = q64 if a is None else q64 * a
        e1 = (fixed + d - y64).pow(2).sum((1, 2))
        out.append(torch.stack([e0, e1], dim=1))
    return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.float64)


def check(
    paired: Paired | None, delta: torch.Tensor, scale: torch.Tensor | None, tag: str
) -> LayerCheck | None:
    """The verdict on correcting a layer by ``scale``/``delta`` (``None``: no rows to check
    on). Under ``torch.distributed`` the samples of every rank are pooled (in rank order)."""
    if paired is None:
        return None
    err = _errors(paired, delta, scale)
    if active():
        err = torch.cat([torch.as_tensor(e, dtype=torch.float64) for e in exchange(tag, err)])
    if err.shape[0] == 0:
        return None
    med, mean = err.median(dim=0).values, err.mean(dim=0)
    keep = err.max(dim=1).values.argsort()[: max(1, int(err.shape[0] * (1 - TRIM)))]
    trim = err[keep].mean(dim=0)
    finite = bool(torch.isfinite(err[:, 1]).all())
    kept = bool(mean[1] <= mean[0] * (1 + RTOL)) and bool(trim[1] <= trim[0] * (1 + TRIM_SLACK))
    return LayerCheck(
        finite and kept,
        err.shape[0],
        *(float(v) for v in (trim[0], trim[1], mean[0], mean[1], med[0], med[1])),
    )


__all__ = ["RTOL", "TRIM", "TRIM_SLACK", "LayerCheck", "check"]
