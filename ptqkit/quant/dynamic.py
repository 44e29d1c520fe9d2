"""Dynamic activation quantization: the scale (and zero point) of a tensor computed from the
tensor itself at run time, as ONNX Runtime's ``quantize_dynamic``, torchao's
``Int8DynamicActivationInt8WeightConfig`` and LLM.int8()/SmoothQuant's "per-token" activations
do; nothing is calibrated.

The input of a Linear is seen as the matrix ``X = x.reshape(-1, F)`` (``F = x.shape[-1]``, the
features the matmul reduces over). Per row (``spec.per_channel``; one row per token) or for
the whole tensor, with ``lo = min(0, min X_r)``, ``hi = max(0, max X_r)`` over the finite
values (a NaN row stays NaN, ±Inf saturates, as in :func:`~ptqkit.quant.primitives.fake_quant`):

* asymmetric: ``s_r = max((hi - lo) / (2^b - 1), MIN_SCALE)``,
  ``z_r = clamp(round(qmin - lo / s_r), qmin, qmax)``
* symmetric: ``s_r = max(max(-lo, hi) / (2^(b-1) - 1), MIN_SCALE)``, ``z_r = 0``

then ``x̂ = (clamp(round(x / s_r) + z_r, qmin, qmax) - z_r)·s_r`` (round half to even): the
static formulas of :func:`~ptqkit.quant.primitives.qparams`. 8-bit asymmetric per tensor is
ONNX ``DynamicQuantizeLinear`` bit for bit (checked against ONNX Runtime in the tests).

Because ``s_r`` belongs to a row of ``X`` and the weight's scale to a column of the output, the
Linear factors into an integer matmul (Jacob et al. 2018, eq. 4; Dettmers et al. 2022):

    y[r, n] = s_r · s_w[n] · Σ_k (q_x[r,k] - z_r)(q_w[n,k] - z_w[n]) + b[n]
            = s_r · s_w[n] · (A[r, n] - z_r · c[n]) + b[n],
    A = MatMulInteger(q_x, q_wᵀ, 0, z_w),   c[n] = Σ_k (q_w[n,k] - z_w[n])

which :func:`export_linear` writes for ONNX (``A`` and ``z_r·c`` in int32: exact), and which
:func:`integer_linear` computes in the simulation the same way: the integer sum exactly (in
float64, exact while ``K·(2^b-1)·2^8 < 2^53``), then ``float32(acc)·(s_r·s_w[n]) + b[n]`` in
float32, the runtime's own operations in its order, so that simulation and ONNX Runtime agree
bit for bit (a float32 sum of the dequantized products would differ in the last bits, and a
last-bit difference in one layer moves the next layer's per-row rounding: through MiniLM's 6
layers that alone changed the embeddings by up to 7e-3). Per tensor
with the 8-bit asymmetric grid it writes ONNX Runtime's own form instead,
``DynamicQuantizeLinear → MatMulInteger(q_x, q_wᵀ, z_x, z_w) → Cast → Mul(s_x·s_w)``, the
pattern ONNX Runtime fuses into ``DynamicQuantizeMatMul``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import QuantSpec
from .primitives import MIN_SCALE


def rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``x`` as ``[rows, F]`` (per row) or ``[1, numel]`` (per tensor)."""
    return x.reshape(-1, x.shape[-1]) if spec.per_channel and x.dim() else x.reshape(1, -1)


def dynamic_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of :func:`rows` (``[R, 1]`` float32 / int32), from the
    range of its finite values widened to contain 0 (see the module docstring)."""
    x2 = rows(x.detach(), spec).float()
    if x2.shape[1] == 0:
        x2 = torch.zeros(x2.shape[0], 1, device=x.device)
    finite = torch.where(torch.isfinite(x2), x2, torch.zeros((), device=x.device))
    lo = finite.amin(1, keepdim=True).clamp(max=0.0)
    hi = finite.amax(1, keepdim=True).clamp(min=0.0)
    if spec.symmetric:
        scale = (torch.maximum(-lo, hi) / spec.qmax).clamp(min=MIN_SCALE)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp(min=MIN_SCALE)
    zp = torch.clamp(torch.round(spec.qmin - lo / scale), spec.qmin, spec.qmax)
    return scale, zp.to(torch.int32)


def dynamic_quantize(
    x: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, s, z)``: the integers of :func:`rows` ``(x)`` (float32 holding integers, ``[R, F]``)
    with their per-row scales and zero points."""
    scale, zp = dynamic_qparams(x, spec)
    q = torch.clamp(torch.round(rows(x, spec).float() / scale) + zp, spec.qmin, spec.qmax)
    return q, scale, zp


def dynamic_fake_quant(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``x̂ = (q - z)·s`` per row, in ``x``'s shape and dtype."""
    q, scale, zp = dynamic_quantize(x, spec)
    return ((q - zp) * scale).reshape(x.shape).to(x.dtype)


def integer_linear(layer: Any, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """A Linear ``layer`` (:class:`~ptqkit.quant.modules.QuantLayer` with integer weights) on
    the dynamically quantized ``x``, computed as the runtime does (module docstring)."""
    q, s, z = dynamic_quantize(x, spec)
    wq = layer.weight_int.double() - layer.weight_zero_point.double().reshape(-1, 1)  # [N, K]
    k = x.shape[-1]
    acc = (q.reshape(-1, k).double() - z.double()) @ wq.t()  # exact integers
    sw = layer.weight_scale.float().reshape(-1)
    y = (acc.float() * (s * sw)).reshape(*x.shape[:-1], wq.shape[0])
    bias = layer.bias
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# -- ONNX export -----------------------------------------------------------------------------------
class _MatMulInteger(torch.autograd.Function):
    """``Σ_k a[..., k]·(b[k, n] - z_b[n])`` in int32; exported as ONNX ``MatMulInteger``."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
        out = a.double() @ (b.double() - zb.double())
        return out.to(torch.int32)

    @staticmethod
    def symbolic(g: Any, a: Any, b: Any, zb: Any) -> Any:
        zero = g.op("Constant", value_t=torch.tensor(0, dtype=torch.uint8))
        return g.op("MatMulInteger", a, b, zero, zb)


class _DynamicMatMul(torch.autograd.Function):
    """ONNX Runtime's per-tensor form: ``DynamicQuantizeLinear → MatMulInteger → Cast → Mul``
    (float result ``s_x·s_w[n]·Σ_k (q_x - z_x)(q_w - z_w)``)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, b: torch.Tensor, zb: torch.Tensor, sw: torch.Tensor
    ) -> torch.Tensor:
        q, s, z = dynamic_quantize(x, QuantSpec(bits=8, symmetric=False, dynamic=True))
        acc = (q.reshape(x.shape).double() - z.double()) @ (b.double() - zb.double())
        return acc.float() * (s * sw)

    @staticmethod
    def symbolic(g: Any, x: Any, b: Any, zb: Any, sw: Any) -> Any:
        q, s, z = g.op("DynamicQuantizeLinear", x, outputs=3)
        acc = g.op("MatMulInteger", q, b, z, zb)
        acc = g.op("Cast", acc, to_i=1)  # FLOAT
        return g.op("Mul", acc, g.op("Mul", s, sw))


def export_linear(layer: Any, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The traced computation of a Linear ``layer`` (a :class:`~ptqkit.quant.modules.QuantLayer`
    with integer weights) on a dynamically quantized input: the integer form of the module
    docstring, which the TorchScript ONNX exporter writes as ``MatMulInteger`` nodes."""
    qw = layer.weight_int.t()  # [K, N]: constant-folded into one initializer
    zw = layer.weight_zero_point.to(layer.weight_int.dtype).reshape(-1)
    sw = layer.weight_scale.float().reshape(-1)
    bias = layer.bias
    if spec.bits == 8 and not spec.symmetric and not spec.per_channel:
        y = _DynamicMatMul.apply(x, qw, zw, sw)
    else:
        xf = x if x.dtype == torch.float32 else x.float()
        lo = xf.amin(-1, keepdim=True).clamp(max=0.0) if spec.per_channel else xf.min().clamp(max=0)
        hi = xf.amax(-1, keepdim=True).clamp(min=0.0) if spec.per_channel else xf.max().clamp(min=0)
        if spec.symmetric:  # signed grid shifted by 128 onto uint8: the zero point becomes 128
            s = (torch.maximum(-lo, hi) / spec.qmax).clamp(min=MIN_SCALE)
            z = torch.zeros_like(s) - spec.qmin
            q = torch.clamp(torch.round(xf / s), spec.qmin, spec.qmax) - spec.qmin
        else:
            s = ((hi - lo) / (spec.qmax - spec.qmin)).clamp(min=MIN_SCALE)
            z = torch.clamp(torch.round(spec.qmin - lo / s), spec.qmin, spec.qmax)
            q = torch.clamp(torch.round(xf / s) + z, spec.qmin, spec.qmax)
        acc = _MatMulInteger.apply(q.to(torch.uint8), qw, zw)
        c = (layer.weight_int.int() - layer.weight_zero_point.int().reshape(-1, 1)).sum(1)
        # c[n] as a constant of the trace (an int32 [N] initializer), not ReduceSum of an int64
        # copy of the weight, which the exporter does not fold
        colsum = torch.tensor(c.tolist(), dtype=torch.int32, device=x.device)
        acc = acc - z.to(torch.int32) * colsum
        y = acc.float() * (s * sw)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
