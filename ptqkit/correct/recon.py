"""Layer-wise reconstruction objectives of AdaRound (Nagel et al. 2020) and their gradient with
respect to the soft-rounded weight ``W̃``, on the sampled rows of one layer: ``x̂ [n, g, k]``
(input patches per group of the partially quantized network) and float targets ``y [n, O]``.

    rec(W̃) = (1/n) Σ_p ‖f(W̃ x̂_p + b) - f(y_p)‖²

* :class:`RowObjective` (any clipping activation ``f`` after the layer: ReLU, ReLU6, ...):
  mini-batches of ``rows_per_step`` rows: the rows are shuffled once (seeded), cut into
  mini-batches, and each epoch visits them in a new random order (each row once per epoch, drawn
  without copying, rather than rows drawn with replacement at every step: the same expected
  gradient, less variance, no per-step gather);
  ``∂rec/∂W̃ = (2/B) Σ_p (f(W̃x̂_p + b) - f(y_p)) ⊙ f'(·) x̂_pᵀ``.
* :class:`GramObjective` (no activation: a linear bottleneck, a conv before a residual add, the
  classifier): ``rec`` is then a quadratic form of the augmented weight ``W' = [W̃, b]`` and input
  ``x' = [x̂, 1]``,

      rec = Σ_g tr(W'_g H_g W'_gᵀ) - 2 tr(W'_g C_gᵀ) + ‖y‖²/n,
      H_g = (1/n) Σ_p x'_p x'_pᵀ,  C_g = (1/n) Σ_p y_p x'_pᵀ,  ∂rec/∂W̃ = 2 (W' H - C)[:, :k],

  computed once from *all* the rows: every step then takes the exact full-batch gradient at a
  cost of ``O·k²`` instead of ``2·B·k·O`` per mini-batch (used when ``k < 2B``). Same objective,
  no sampling noise.

The three layouts of the product ``W̃ x̂``: one group (a matmul), one output channel per group
(depthwise: an elementwise product summed over ``k``), the general grouped case (``bmm``).
"""

from __future__ import annotations

from typing import Any

import torch

Bounds = tuple[torch.Tensor, torch.Tensor] | None


def _shape(w: torch.Tensor, g: int) -> torch.Tensor:
    return w.reshape(g, w.shape[0] // g, -1)  # [g, O/g, k]


def product(w: torch.Tensor, x: torch.Tensor, g: int) -> torch.Tensor:
    """``W x`` for rows ``x [B, g, k]`` → ``[B, O]``."""
    wg = _shape(w, g)
    if g == 1:
        return x[:, 0] @ wg[0].T
    if wg.shape[1] == 1:
        return (x * wg[:, 0]).sum(-1)
    return torch.bmm(x.transpose(0, 1), wg.transpose(1, 2)).transpose(0, 1).reshape(x.shape[0], -1)


def product_grad(d_out: torch.Tensor, x: torch.Tensor, g: int, w_shape: torch.Size) -> torch.Tensor:
    """``∂/∂W`` of ``Σ d_out ⊙ (W x)`` for rows ``x [B, g, k]``, ``d_out [B, O]``."""
    if g == 1:
        return (d_out.T @ x[:, 0]).reshape(w_shape)
    og = w_shape[0] // g
    if og == 1:
        return (d_out.unsqueeze(-1) * x).sum(0).reshape(w_shape)
    d = d_out.reshape(d_out.shape[0], g, og).transpose(0, 1)  # [g, B, O/g]
    return torch.bmm(d.transpose(1, 2), x.transpose(0, 1)).reshape(w_shape)


def clip(t: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    if bounds is None:
        return t
    return torch.minimum(torch.maximum(t, bounds[0]), bounds[1])


class RowObjective:
    """``rec`` on mini-batches of rows, with the activation ``bounds`` (or none)."""

    def __init__(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None,
        bounds: Bounds,
        g: int,
        rows_per_step: int,
        seed: int,
    ) -> None:
        self.x, self.g, self.bias, self.bounds = x, g, bias, bounds
        self.goal = clip(target, bounds)
        self.n = x.shape[0]
        self.b = min(self.n, rows_per_step)
        self.gen = torch.Generator().manual_seed(seed)
        self.xe, self.ge = x, self.goal
        if self.b < self.n:  # the rows shuffled once (one copy), then cut into mini-batches
            perm = torch.randperm(self.n, generator=self.gen).to(x.device)
            self.xe, self.ge = x.index_select(0, perm), self.goal.index_select(0, perm)
        self.slices: list[int] = []

    @property
    def step_macs(self) -> int:
        """Multiply-adds per step (forward and gradient)."""
        return 2 * self.b * self.x.shape[-1] * self.goal.shape[-1]

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.b == self.n:
            return self.x, self.goal
        if not self.slices:  # a new epoch: the mini-batches in a new random order
            self.slices = torch.randperm(-(-self.n // self.b), generator=self.gen).tolist()
        a = min(self.slices.pop() * self.b, self.n - self.b)  # the last one ends at row n
        return self.xe[a : a + self.b], self.ge[a : a + self.b]

    def _out(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        pre = product(w, x, self.g)
        return pre + self.bias if self.bias is not None else pre

    def grad(self, w: torch.Tensor) -> torch.Tensor:
        xb, gb = self._batch()
        pre = self._out(w, xb)
        d = (clip(pre, self.bounds) - gb).mul_(2.0 / xb.shape[0])
        if self.bounds is not None:
            d = d * ((pre > self.bounds[0]) & (pre < self.bounds[1]))
        return product_grad(d, xb, self.g, w.shape)

    def loss(self, w: torch.Tensor, chunk: int = 8192) -> float:
        total = 0.0
        for a in range(0, self.n, chunk):
            out = clip(self._out(w, self.x[a : a + chunk]), self.bounds)
            total += float((out - self.goal[a : a + chunk]).pow(2).sum())
        return total / max(1, self.n)


class GramObjective:
    """``rec`` of a layer with no activation after it, through the Gram matrices of all rows."""

    def __init__(self, x: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None, g: int):
        self.g, self.bias = g, bias
        n, _, k = x.shape
        self.k = k
        xa = torch.cat([x, x.new_ones(n, g, 1)], -1) if bias is not None else x
        xg = xa.transpose(0, 1)  # [g, n, k']
        yg = target.reshape(n, g, -1).transpose(0, 1)  # [g, n, O/g]
        self.h = torch.bmm(xg.transpose(1, 2), xg) / n  # [g, k', k']
        self.c = torch.bmm(yg.transpose(1, 2), xg) / n  # [g, O/g, k']
        self.yy = float(target.double().pow(2).sum() / n)

    @property
    def step_macs(self) -> int:
        """Multiply-adds per step."""
        return int(self.h.shape[0] * self.c.shape[1] * self.h.shape[1] ** 2)

    def _aug(self, w: torch.Tensor) -> torch.Tensor:
        wg = _shape(w, self.g)
        if self.bias is None:
            return wg
        return torch.cat([wg, self.bias.reshape(self.g, -1, 1)], -1)

    def grad(self, w: torch.Tensor) -> torch.Tensor:
        wa = self._aug(w)
        d = 2 * (torch.bmm(wa, self.h) - self.c)
        return d[..., : self.k].reshape(w.shape)

    def loss(self, w: torch.Tensor) -> float:
        wa = self._aug(w)
        quad = (torch.bmm(wa, self.h) * wa).sum() - 2 * (wa * self.c).sum()
        return float(quad) + self.yy


def objective(
    x: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    bounds: Bounds,
    g: int,
    rows_per_step: int,
    seed: int,
) -> Any:
    """The cheaper exact form for this layer: :class:`GramObjective` when there is no
    activation and ``k < 2·rows per step``, else :class:`RowObjective`."""
    if bounds is None and x.shape[-1] + 1 < 2 * min(x.shape[0], rows_per_step):
        return GramObjective(x, target, bias, g)
    return RowObjective(x, target, bias, bounds, g, rows_per_step, seed)


__all__ = ["GramObjective", "RowObjective", "clip", "objective", "product", "product_grad"]
