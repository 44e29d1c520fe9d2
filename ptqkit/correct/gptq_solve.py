"""The GPTQ solver (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", Algorithm 1): integer weights for one layer from its
Hessian, column by column with error feedback.

For a layer ``y = W x`` and inputs ``X`` (one column per row of the calibration data), the error
``‖W X - Ŵ X‖²`` is the quadratic form of ``H = 2 X Xᵀ / n`` (``[K, K]``, ``K`` inputs) in
``W - Ŵ``. Quantizing one column ``q`` (to ``Q(w_q)``) and updating the columns not yet
quantized by the optimal compensation (Optimal Brain Quantization),

    δ = (w_q - Q(w_q)) / [H⁻¹]_qq,     W[:, F] ← W[:, F] - δ · [H⁻¹]_{q, F}

and doing so in a fixed column order lets every step use one row of the upper Cholesky factor
``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``): ``δ = (w_j - Q(w_j)) / U_jj``, ``W[:, j+1:] -= δ U_{j, j+1:}``.

* **Dead inputs** (``H_ii = 0``: input ``i`` is 0 on every calibration row) get ``H_ii = 1``; their
  row and column of ``H`` are 0 already, so no error flows into or out of them: their weights are
  rounded to nearest (with their group's scale), not zeroed as in the reference code, so that the
  layer stays right on inputs where they are not 0.
* **Damping**: ``H + λ · mean(diag H) · I`` (``λ = damp = 0.01``); if the Cholesky factorization
  still fails, ``λ`` is multiplied by 10, up to 4 times (recorded), then the layer is rounded to
  nearest (recorded by the caller).
* **Lazy batch updates**: columns are processed in blocks of ``B = block_size`` (128); inside a
  block the rank-1 updates touch only the block, the rest of ``W`` gets one matrix product per
  block, ``W[:, i2:] -= Δ_block · U[i1:i2, i2:]``. Same result as column by column, in float.
* **Group-wise scales** (``spec.group_size = g``): the scale (and zero point) of a group of ``g``
  consecutive inputs is chosen when its first column comes up, from the *current* weights of all
  its columns (error feedback of the columns already quantized included: for columns past the
  current block the pending lazy update is applied to that copy), by min/max or the mse search
  of :func:`ptqkit.calibrate.weights.mse_groups`. Per-channel / per-tensor scales are computed
  once from the float weight, as for nearest rounding.
* **act-order**: columns in order of decreasing ``diag(H)``. The groups stay those of the stored
  layout (``g`` consecutive inputs in the original order); a group's scale is chosen when the
  first of its columns in the permuted order comes up, from the current values of all its
  columns (all still unquantized then). Applied to one weight matrix at a time (``G = 1``); a
  grouped conv keeps the natural order (recorded).

Everything is batched over ``G`` independent problems (the groups of a grouped / depthwise conv:
``W [G, O, K]``, ``H [G, K, K]``); a Linear or a ``groups=1`` conv is ``G = 1``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..calibrate.weights import mse_groups
from ..config import GPTQOptions, QuantSpec
from ..quant.primitives import qparams
from .threads import threads

#: times the damping is multiplied by 10 when the Cholesky factorization fails
DAMP_RETRIES = 4


@dataclass
class Solved:
    """One layer's result: integers ``q [G, O, K]`` (float, original column order), their scales
    and zero points (``[G, O]`` per channel, ``[G, O, n]`` group-wise, ``()`` per tensor), and
    the damping finally used (``None``: the factorization failed)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    damp: float | None
    dead: int


def inverse_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor ``U`` of ``(H + λ·mean(diag H)·I)⁻¹`` (``[G, K, K]``), retrying with
    ``λ·10`` on failure; ``(None, λ)`` if it never factorizes."""
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    mean = h.diagonal(dim1=1, dim2=2).mean(dim=1)[:, None, None]
    for _ in range(DAMP_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(h + damp * mean * eye)
        if not bool(info.any()):
            inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if not bool(info.any()):
                return upper, damp
        damp *= 10
    return None, damp


def _group_params(
    cur: torch.Tensor, spec: QuantSpec, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale / zero point ``[G, O]`` of the group whose current weights are ``cur [G, O, g]``."""
    flat = dataclasses.replace(spec, group_size=None, axis=0)
    rows = cur.reshape(-1, cur.shape[-1])
    if method == "mse":
        lo, hi = mse_groups(rows, spec)
    else:
        lo, hi = rows.min(dim=1).values, rows.max(dim=1).values
    s, z = qparams(lo, hi, flat)
    return s.reshape(cur.shape[:2]), z.reshape(cur.shape[:2])


class _Grid:
    """The scales of the columns as they come up: fixed (per channel / tensor) or chosen per
    group on first use (see the module docstring)."""

    def __init__(
        self, spec: QuantSpec, shape: tuple[int, int, int], fixed: Any, perm: torch.Tensor | None
    ) -> None:
        self.spec, self.method = spec, "minmax"
        g_, o, k = shape
        self.fixed = fixed  # (scale, zp) broadcastable to [G, O], or None (group-wise)
        if spec.group_size is not None:
            gs = spec.group_size
            n = -(-k // gs)
            self.scale = torch.ones(g_, o, n)
            self.zp = torch.zeros(g_, o, n, dtype=torch.int32)
            orig = torch.arange(k) if perm is None else perm
            self.group_of = (orig // gs).tolist()  # group of the column at each position
            pos = torch.empty(k, dtype=torch.long)
            pos[orig] = torch.arange(k)
            self.positions = [pos[j * gs : (j + 1) * gs] for j in range(n)]  # where its columns are
            self.done = [False] * n

    def at(self, j: int, current: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zp)`` ``[G, O]`` floats for the column at position ``j``; ``current(pos)``
        gives the current weights ``[G, O, len(pos)]`` at positions ``pos``."""
        if self.fixed is not None:
            return self.fixed
        grp = self.group_of[j]
        if not self.done[grp]:
            s, z = _group_params(current(self.positions[grp]), self.spec, self.method)
            self.scale[:, :, grp], self.zp[:, :, grp] = s, z
            self.done[grp] = True
        return self.scale[:, :, grp], self.zp[:, :, grp].float()


def solve(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    options: GPTQOptions,
    fixed: tuple[torch.Tensor, torch.Tensor] | None = None,
    method: str = "minmax",
) -> Solved:
    """GPTQ on ``w [G, O, K]`` with Hessians ``h [G, K, K]`` (module docstring). ``fixed``: the
    per-channel (``[G, O]``) or per-tensor scale and zero point, for a spec without groups.
    Computes in ``h``'s dtype (float32 in the pipeline; float64 in the tests)."""
    dtype = h.dtype
    w = w.to(dtype).clone()
    h = h.clone()
    diag = h.diagonal(dim1=1, dim2=2)
    dead = diag == 0
    diag[dead] = 1.0
    g_, o, k = w.shape
    perm = None
    if options.act_order and g_ == 1:
        perm = torch.argsort(diag[0], descending=True, stable=True)
        w, h = w[:, :, perm], h[:, perm][:, :, perm]
    u, damp = inverse_factor(h, options.damp)
    fx = None
    if fixed is not None:
        fx = (fixed[0].to(dtype).expand(g_, o), fixed[1].to(dtype).expand(g_, o))
    grid = _Grid(spec, (g_, o, k), fx, perm)
    grid.method = method
    if u is None:  # the caller rounds the layer to nearest
        return Solved(w, torch.ones(()), torch.zeros((), dtype=torch.int32), None, int(dead.sum()))
    q = torch.zeros_like(w)
    bs = options.block_size
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        wb, err = w[:, :, i1:i2], torch.zeros(g_, o, i2 - i1, dtype=dtype)

        def current(
            pos: torch.Tensor, i: int, i1: int = i1, i2: int = i2, err: torch.Tensor = err
        ) -> torch.Tensor:
            cur = w[:, :, pos].clone()
            late = pos >= i2  # not yet given this block's lazy update
            if bool(late.any()) and i > 0:
                cur[:, :, late] -= err[:, :, :i] @ u[:, i1 : i1 + i][:, :, pos[late]]
            return cur

        # one thread for the column loop: ~10 small operations per column (``O`` to ``O·B``
        # elements); with several threads each waits for every thread, and on a loaded machine
        # that wait dominates (a 4096x4096 solve measured 5 to 50 s with 2 threads under other
        # processes' load); the block products and the factorization keep the caller's threads
        with threads(1):
            for i in range(i2 - i1):
                s, z = grid.at(i1 + i, lambda pos, i=i: current(pos, i))
                s, z = s.to(dtype), z.to(dtype)
                col = wb[:, :, i]
                qi = torch.clamp(torch.round(col / s) + z, spec.qmin, spec.qmax)
                q[:, :, i1 + i] = qi
                e = (col - (qi - z) * s) / u[:, i1 + i, i1 + i][:, None]
                wb[:, :, i:] -= e[:, :, None] * u[:, None, i1 + i, i1 + i : i2]
                err[:, :, i] = e
        if i2 < k:
            w[:, :, i2:] -= err @ u[:, i1:i2, i2:]
    if perm is not None:
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(k)
        q = q[:, :, inv]
    scale, zp = (grid.scale, grid.zp) if fixed is None else fixed
    return Solved(q, scale, zp, damp, int(dead.sum()))


def output_error(d: torch.Tensor, h: torch.Tensor) -> float:
    """``Σ_g tr(D_g H_g D_gᵀ)``: the layer's mean squared output error (summed over channels)
    on the calibration rows for a weight error ``d [G, O, K]`` and ``h = X Xᵀ / n``."""
    return float(((d.to(h.dtype) @ h) * d.to(h.dtype)).sum())


__all__ = ["DAMP_RETRIES", "Solved", "inverse_factor", "output_error", "solve"]
