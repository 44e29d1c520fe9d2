"""The optimizer of AdaRound (Nagel et al. 2020), with its gradients written out.

:func:`ptqkit.correct.adaround.round_layer` learns a soft rounding ``h(V)`` per weight:

    W̃ = s · (clamp(⌊W/s⌋ + h(V) + z, qmin, qmax) - z),   h(V) = clamp(σ(V)·(ζ - γ) + γ, 0, 1)

by Adam on ``reconstruction + λ · Σ (1 - |2h - 1|^β)``. This module holds what does not depend on
what is reconstructed (:mod:`ptqkit.correct.recon` holds the reconstruction terms):

* :class:`SoftRounding`: ``V`` of one weight tensor, ``W̃(h)``, and the chain rule from
  ``∂L/∂W̃`` to ``∂L/∂V``:

      ∂L/∂V = (∂L/∂W̃ · s · 1[qmin ≤ ⌊W/s⌋ + h + z ≤ qmax] + ∂R/∂h) · σ'(V)·(ζ - γ) · 1[0 < ĥ < 1]

  with ``ĥ`` the unclipped ``σ(V)·(ζ - γ) + γ`` and the regularizer's
  ``∂R/∂h = -2 λ β · sign(2h - 1) · |2h - 1|^(β - 1)``.
* :func:`adam_step`: Adam (Kingma & Ba 2015) on ``V``, in place.
* :func:`beta_at`: the annealed exponent ``β`` (linear from ``beta[0]`` to ``beta[1]`` after the
  warm-up) and whether the regularizer is on.
* :func:`settled`: the early stop. Once the regularizer is on, every ``h`` in ``{0, 1}`` exactly
  (the rectified sigmoid is flat there) makes both gradients zero: the reconstruction term's
  (``1[0 < ĥ < 1]`` = 0) and the regularizer's; ``V`` then only drifts on Adam's decaying
  momentum, away from the threshold it crossed to get there. The rounding is decided; further
  steps cost time and change nothing in practice (the final rounding is ``V ≥ 0``, and a ``V``
  past the flat edge ``|V| ≥ log 11`` would need the momentum to carry it back across 0).

Writing the gradients out (instead of autograd) removes the graph bookkeeping that dominated the
per-step time of the small layers of CNNs; the arithmetic is the same.
"""

from __future__ import annotations

import math

import torch

from ..config import AdaRoundOptions
from ..quant.modules import QuantLayer
from ..quant.primitives import broadcast_along, storage_dtype

#: the rectified sigmoid's stretch (Louizos et al. 2018, as in the paper)
ZETA, GAMMA = 1.1, -0.1
#: Adam's moment decays and epsilon
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8
#: steps between two checks of the early stop
CHECK_EVERY = 10


def h_of(v: torch.Tensor) -> torch.Tensor:
    """The rectified sigmoid ``h(V)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def penalty(h: torch.Tensor, beta: float) -> torch.Tensor:
    """The rounding regularizer without its weight: ``Σ (1 - |2h - 1|^β)`` (differentiable)."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


class SoftRounding:
    """``V`` and the fixed parts (``⌊W/s⌋``, ``s``, ``z``) of one layer's learned rounding.

    ``V`` starts so that ``h(V)`` is the fractional part of ``W/s`` (``W̃ = W`` inside the grid).
    """

    def __init__(self, layer: QuantLayer, scale: torch.Tensor, zp: torch.Tensor) -> None:
        self.spec = layer.spec
        w = layer.weight_fp.detach().float()
        self.shape = w.shape
        self.s = broadcast_along(scale.to(w.device).float(), w, self.spec.axis)
        self.z = broadcast_along(zp.to(w.device).float(), w, self.spec.axis)
        ws = w / self.s
        self.floor = torch.floor(ws)
        self.base = self.floor + self.z  # ⌊W/s⌋ + z
        rest = (ws - self.floor).clamp(0, 1)
        p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.v = torch.log(p / (1 - p))
        self.m1 = torch.zeros_like(self.v)
        self.m2 = torch.zeros_like(self.v)
        self.t = 0
        self.step = torch.zeros((), device=w.device)  # ``t`` for the fused Adam kernel
        self.nearest_q = torch.clamp(torch.round(ws) + self.z, self.spec.qmin, self.spec.qmax)
        # ∂W̃/∂h: s where ⌊W/s⌋ + z + h stays inside the grid for h in (0, 1) (outside it the
        # clamp is flat; at the two edge cases it is flat for every h where ∂h/∂V is not 0)
        inside = (self.base >= self.spec.qmin) & (self.base <= self.spec.qmax - 1)
        self.dq = self.s * inside
        # W̃ = c0 + dq·h: inside the grid s·(⌊W/s⌋ + z + h - z); outside it the clamped edge
        edge = torch.clamp(self.base, self.spec.qmin, self.spec.qmax)
        self.c0 = (edge - self.z) * self.s
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def soft(self) -> torch.Tensor:
        """``W̃`` at the current ``V`` (and remembers what :meth:`grad` needs). Eight tensor
        operations: a step of a small layer costs about its count of them."""
        sig = torch.sigmoid(self.v)
        s1 = sig * (ZETA - GAMMA)
        raw = s1 + GAMMA
        h = raw.clamp(0, 1)
        # ∂h/∂V = σ'(V)·(ζ - γ) = s1 - s1·σ, where the rectified sigmoid is not flat
        dh = torch.addcmul(s1, s1, sig, value=-1).mul_(h == raw)
        self._cache = (h, dh)
        return torch.addcmul(self.c0, self.dq, h)

    def grad(self, d_w: torch.Tensor, reg: float, beta: float | None) -> torch.Tensor:
        """``∂L/∂V`` from ``∂L/∂W̃`` (at the ``V`` of the last :meth:`soft`), plus the
        regularizer's when ``beta`` is not ``None``."""
        assert self._cache is not None, "soft() first"
        h, dh = self._cache
        g = d_w.reshape(self.shape) * self.dq
        if beta is not None and reg > 0:
            a = h * 2 - 1
            if beta >= 2:  # sign(a)·|a|^(β-1) = a·|a|^(β-2), finite at a = 0
                g.addcmul_(a, a.abs().pow_(beta - 2), value=-2 * reg * beta)
            else:
                mag = a.abs()
                mag = torch.where(mag > 0, mag.clamp_min(1e-30).pow(beta - 1), 0.0)
                g.addcmul_(torch.sign(a), mag, value=-2 * reg * beta)
        return g.mul_(dh)

    def regularizer(self, beta: float) -> float:
        return float(penalty(h_of(self.v), beta))

    def undecided(self) -> int:
        """How many ``h`` are strictly between 0 and 1."""
        h = h_of(self.v)
        return int(((h > 0) & (h < 1)).sum())

    def hard(self) -> torch.Tensor:
        """The integer weight: ``h`` rounded (``V ≥ 0`` → up), in the storage dtype."""
        up = (self.v >= 0).float()
        q = torch.clamp(self.floor + up + self.z, self.spec.qmin, self.spec.qmax)
        return q.to(storage_dtype(self.spec))

    def dequant(self, q: torch.Tensor) -> torch.Tensor:
        return (q.float() - self.z) * self.s


#: PyTorch's fused Adam kernel (what ``torch.optim.Adam(fused=True)`` calls): one kernel for
#: the ~8 tensor operations of the step below, the same arithmetic (equal to 6e-7 after 500
#: steps); ``None`` where this PyTorch has none
FUSED_ADAM = getattr(torch, "_fused_adam_", None)


def adam_step(r: SoftRounding, grad: torch.Tensor, lr: float) -> None:
    """One Adam step on ``r.v`` (bias-corrected moments):
    ``m₁ ← β₁m₁ + (1-β₁)g``, ``m₂ ← β₂m₂ + (1-β₂)g²``,
    ``V ← V - lr/(1-β₁ᵗ) · m₁ / (√(m₂/(1-β₂ᵗ)) + ε)``."""
    r.t += 1
    grad = grad.contiguous()  # the fused kernel reads every tensor as laid out like ``V``
    if FUSED_ADAM is not None:
        r.step.fill_(r.t)
        FUSED_ADAM(
            [r.v],
            [grad],
            [r.m1],
            [r.m2],
            [],
            [r.step],
            amsgrad=False,
            lr=lr,
            beta1=ADAM_B1,
            beta2=ADAM_B2,
            weight_decay=0.0,
            eps=ADAM_EPS,
            maximize=False,
        )
        return
    r.m1.mul_(ADAM_B1).add_(grad, alpha=1 - ADAM_B1)
    r.m2.mul_(ADAM_B2).addcmul_(grad, grad, value=1 - ADAM_B2)
    step = lr / (1 - ADAM_B1**r.t)
    denom = (r.m2 / (1 - ADAM_B2**r.t)).sqrt_().add_(ADAM_EPS)
    r.v.addcdiv_(r.m1, denom, value=-step)


def beta_at(t: int, iters: int, opts: AdaRoundOptions) -> float | None:
    """``β`` at step ``t`` of ``iters``, or ``None`` during the warm-up (no regularizer)."""
    warm = int(opts.warmup * iters)
    if t < warm:
        return None
    beta_start, beta_end = opts.beta
    frac = (t - warm) / max(1, iters - warm)
    return beta_end + (beta_start - beta_end) * (1 - frac)


def settled(t: int, iters: int, opts: AdaRoundOptions, roundings: list[SoftRounding]) -> bool:
    """The early stop (see the module docstring): the regularizer is on, and every ``h`` of
    every rounding is exactly 0 or 1. Checked every :data:`CHECK_EVERY` steps."""
    if not opts.early_stop or t % CHECK_EVERY or beta_at(t, iters, opts) is None:
        return False
    return all(r.undecided() == 0 for r in roundings)


#: ``|V|`` beyond which ``h(V)`` is exactly 0 or 1: ``σ(V)·1.2 - 0.1 ∉ (0, 1)``
FLAT_EDGE = math.log(11.0)

__all__ = [
    "FLAT_EDGE",
    "GAMMA",
    "ZETA",
    "SoftRounding",
    "adam_step",
    "beta_at",
    "h_of",
    "penalty",
    "settled",
]
