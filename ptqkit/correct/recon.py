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


def arrange(x: torch.Tensor, g: int, out_channels: int) -> torch.Tensor:
    """Rows ``x [B, g, k]`` in the layout :func:`product` takes: ``[B, k]`` for one group (a
    matmul), ``[B, k, g]`` for depthwise (one output channel per group: the channels innermost,
    so the products and the sums over ``k`` vectorize over channels: the forward and gradient
    products of a step at ``g = 192``, ``k = 9``, 256 rows took 1.27 ms as ``[B, g, k]`` and
    0.35 ms as ``[B, k, g]``, one thread), ``[B, g, k]`` otherwise."""
    if g == 1:
        return x[:, 0]
    if out_channels == g:
        return x.transpose(1, 2).contiguous()
    return x


def product(
    w: torch.Tensor, x: torch.Tensor, g: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``W x + b`` for rows ``x`` laid out by :func:`arrange` → ``[B, O]``."""
    if g == 1:
        w2 = w.reshape(w.shape[0], -1)
        return x @ w2.T if bias is None else torch.addmm(bias, x, w2.T)
    if w.shape[0] == g:
        out = (x * w.reshape(g, -1).T.contiguous()).sum(1)  # (a strided [k, g]: 4x slower)
    else:
        wg = _shape(w, g)
        out = torch.bmm(x.transpose(0, 1), wg.transpose(1, 2)).transpose(0, 1)
        out = out.reshape(x.shape[0], -1)
    return out if bias is None else out + bias


def product_grad(
    d_out: torch.Tensor, x: torch.Tensor, g: int, w_shape: torch.Size, scale: float
) -> torch.Tensor:
    """``scale · ∂/∂W`` of ``Σ d_out ⊙ (W x)`` for rows ``x`` laid out by :func:`arrange`,
    ``d_out [B, O]``."""
    if g == 1:
        return (d_out.T @ x).mul_(scale).reshape(w_shape)
    og = w_shape[0] // g
    if og == 1:
        return (d_out.unsqueeze(1) * x).sum(0).mul_(scale).T.reshape(w_shape)
    d = d_out.reshape(d_out.shape[0], g, og).transpose(0, 1)  # [g, B, O/g]
    return torch.bmm(d.transpose(1, 2), x.transpose(0, 1)).mul_(scale).reshape(w_shape)


def clip(t: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    return t if bounds is None else torch.clamp(t, bounds[0], bounds[1])


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
        self.k = x.shape[-1]
        self.x = arrange(x, g, target.shape[1])
        self.g, self.bias, self.bounds = g, bias, bounds
        self.goal = clip(target, bounds)
        # one (lo, hi) for every channel (ReLU, ReLU6, clamp; not a per-channel clamp): clipped
        # and masked with floats, the mask by ``hardtanh_backward`` (autograd's kernel for it:
        # one operation instead of a comparison and a product, 0.016 vs 0.15 ms at 256 x 192)
        self.flat: tuple[float, float] | None = None
        if bounds is not None and bounds[0].numel() == 1 and bounds[1].numel() == 1:
            self.flat = (float(bounds[0]), float(bounds[1]))
        self.n = x.shape[0]
        self.b = min(self.n, rows_per_step)
        self.gen = torch.Generator().manual_seed(seed)
        self.xe, self.ge = x, self.goal
        if self.b < self.n:  # the rows shuffled once (one copy), then cut into mini-batches
            perm = torch.randperm(self.n, generator=self.gen).to(x.device)
            self.xe, self.ge = self.x.index_select(0, perm), self.goal.index_select(0, perm)
        self.slices: list[int] = []

    @property
    def step_macs(self) -> int:
        """Multiply-adds per step (forward and gradient)."""
        return 2 * self.b * self.k * self.goal.shape[-1]

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.b == self.n:
            return self.x, self.goal
        if not self.slices:  # a new epoch: the mini-batches in a new random order
            self.slices = torch.randperm(-(-self.n // self.b), generator=self.gen).tolist()
        a = min(self.slices.pop() * self.b, self.n - self.b)  # the last one ends at row n
        return self.xe[a : a + self.b], self.ge[a : a + self.b]

    def grad(self, w: torch.Tensor) -> torch.Tensor:
        xb, gb = self._batch()
        pre = product(w, xb, self.g, self.bias)
        if self.flat is not None:  # f' = 1 where the activation does not clip
            d = torch.ops.aten.hardtanh_backward(pre.clamp(*self.flat) - gb, pre, *self.flat)
        elif self.bounds is not None:
            out = clip(pre, self.bounds)
            d = (out - gb).mul_(out == pre)
        else:
            d = pre - gb
        return product_grad(d, xb, self.g, w.shape, 2.0 / xb.shape[0])

    def loss(self, w: torch.Tensor, chunk: int = 8192) -> float:
        total = 0.0
        for a in range(0, self.n, chunk):
            out = clip(product(w, self.x[a : a + chunk], self.g, self.bias), self.bounds)
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
        # the gradient's first k columns with the bias folded in (one baddbmm per step):
        # 2 (W' H - C)[:, :k] = 2 (W H_ww - (C_w - b H_bw))
        self.h_ww = self.h[:, :k, :k].contiguous()
        self.c_w = self.c[:, :, :k].contiguous()
        if bias is not None:
            self.c_w -= bias.reshape(g, -1, 1) * self.h[:, k:, :k]

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
        d = torch.baddbmm(self.c_w, _shape(w, self.g), self.h_ww, beta=-2, alpha=2)
        return d.reshape(w.shape)

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


__all__ = [
    "GramObjective",
    "RowObjective",
    "arrange",
    "clip",
    "objective",
    "product",
    "product_grad",
]
