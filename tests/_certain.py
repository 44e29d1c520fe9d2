"""Bounds that hold by arithmetic, whatever model the CPU trained (issue 27): what a test may
assert about a quantized model's outputs against the float model's outputs ``f`` and ``q`` of
the same model on the same inputs, instead of a band (``agreement >= 98``) that depends on how
many of the trained model's decisions are near-ties on this machine."""

from __future__ import annotations

import torch


def certain_agreement(f: torch.Tensor, q: torch.Tensor) -> float:
    """Percent of the samples whose class the error ``q - f`` cannot change: sample ``i`` counts
    when the float model's top-2 gap ``g_i = f_(1) - f_(2)`` exceeds ``2·max_j |q_ij - f_ij|``.
    Then ``q_i,top >= f_i,top - e > f_i,other + e >= q_i,other``: the argmax is the same, so the
    true top-1 agreement is at least this share (a theorem, not a band); less 1e-4 points, as
    ptqkit may count percentages in float32."""
    top2 = f.double().topk(2, dim=1).values
    err = (q.double() - f.double()).abs().amax(dim=1)
    return 100.0 * float(((top2[:, 0] - top2[:, 1]) > 2 * err).double().mean()) - 1e-4


def kl_bound(f: torch.Tensor, q: torch.Tensor) -> float:
    """An upper bound of the batch-mean ``KL(softmax f ‖ softmax q)``: with ``d = f - q``,
    ``KL = ψ'(1) - ψ(1)`` for ``ψ(t) = log E_q[e^{t·d}]``, ``= ∫_0^1 t·ψ''(t) dt``, and
    ``ψ'' `` is a variance of ``d``, at most ``(max d - min d)² / 4`` (Popoviciu):
    ``KL <= (max_j d_j - min_j d_j)² / 8`` per sample (Hoeffding's lemma)."""
    d = f.double() - q.double()
    return float(((d.amax(dim=1) - d.amin(dim=1)) ** 2 / 8).mean()) * (1 + 1e-9) + 1e-15
