"""The ``bias_to_int32`` pass: a float bias of ``Conv``/``Gemm``/``MatMul+Add`` fed by ``DQ(x)``
and ``DQ(W)`` → ``DQ(int32, scale = s_x·s_w, zero point 0)``, the bias an integer kernel adds."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import helper

from ...errors import ExportError, PTQWarning
from ..graph import DQ, Graph
from .registry import register_pass

INT32_MAX = 2**31 - 1

def _bias_scale(g: Graph, x_dq, w_dq, nout: int, axis: int) -> tuple[float, np.ndarray] | None:
    """``(s_x, s_w)`` with ``s_w`` a float32 vector of ``nout`` channels, when the input and the
    weight come from constant ``DQ`` nodes and the weight's channel axis is ``axis``."""
    sx = g.qparams(x_dq) if x_dq is not None and x_dq.op_type == DQ else None
    w = g.const(w_dq.input[0]) if w_dq is not None and w_dq.op_type == DQ else None
    sw = g.const(w_dq.input[1]) if w is not None else None
    if sx is None or w is None or sw is None or w.dtype.kind not in "iu":
        return None
    if sw.size != 1 and (g.attr(w_dq, "axis", 1) % w.ndim != axis or sw.size != nout):
        return None
    return float(sx[0].reshape(())), np.broadcast_to(sw.astype(np.float32).reshape(-1), (nout,))


def _widen_weight_scales(g: Graph, w_dq: onnx.NodeProto, sw: np.ndarray, fix: np.ndarray):
    """Give the channels ``fix`` the scales ``sw[fix]`` (larger than before) and requantize their
    integer weights: ``q' = clamp(round((q - z)·s_old/s_new) + z)``. Returns the new scales."""
    w, s_old = g.const(w_dq.input[0]), g.const(w_dq.input[1])
    if w is None or s_old is None:  # _bias_scale found both constant
        raise ExportError(f"{w_dq.name}: the integer weight or its scale is not a constant")
    zp = g.const(w_dq.input[2]) if len(w_dq.input) > 2 and w_dq.input[2] else np.zeros(1, w.dtype)
    if zp is None:
        raise ExportError(f"{w_dq.name}: the weight's zero point is not a constant")
    old = np.broadcast_to(s_old.astype(np.float64).reshape(-1), sw.shape)
    zp = np.broadcast_to(zp.astype(np.float64).reshape(-1), sw.shape)
    axis = g.attr(w_dq, "axis", 1) % w.ndim
    wc = np.moveaxis(w, axis, 0).astype(np.float64).copy()
    ratio = (old / sw.astype(np.float64))[fix].reshape([-1] + [1] * (w.ndim - 1))
    zf = zp[fix].reshape(ratio.shape)
    info = np.iinfo(w.dtype)
    wc[fix] = np.clip(np.rint((wc[fix] - zf) * ratio) + zf, info.min, info.max)
    base = w_dq.input[0].replace("onnx::", "")
    w_dq.input[0] = g.add_init(np.moveaxis(wc, 0, axis).astype(w.dtype), base + "_fit")
    w_dq.input[1] = g.add_init(sw.astype(np.float32), w_dq.input[1].replace("onnx::", "") + "_fit")
    return sw


def _quantize_bias(g: Graph, b: np.ndarray, sx: float, sw: np.ndarray, w_dq, where: str):
    """``(round(b / (s_x·s_w)) as int32, s_x·s_w)``.

    A channel whose bias does not fit in int32 at that scale (a channel with near-zero weights,
    whose weight scale is tiny) gets the weight scale ``|b| / (s_x·2^30)`` and its integer
    weights are requantized to it; the change to the channel's output is at most
    ``K·(2^8-1)·|b|/2^31`` for ``K`` inputs (a relative ``1e-4`` of the bias for ``K = 1000``),
    where clipping the bias would lose it. With per-tensor weight scales the bias is clipped,
    with a warning.
    """
    b = b.astype(np.float64).reshape(-1)
    scale = (np.float32(sx) * sw).astype(np.float32)
    over = np.abs(np.rint(b / scale)) > INT32_MAX
    s_w = g.const(w_dq.input[1])  # constant: checked by _bias_scale
    if over.any() and s_w is not None and s_w.size == len(b) > 1:
        sw = sw.astype(np.float32).copy()
        sw[over] = (np.abs(b[over]) / (sx * 2.0**30)).astype(np.float32)
        sw = _widen_weight_scales(g, w_dq, sw, over)
        scale = (np.float32(sx) * sw).astype(np.float32)
        over = np.abs(np.rint(b / scale)) > INT32_MAX
    if over.any():
        warnings.warn(
            f"{where}: the bias of {int(over.sum())} channel(s) exceeds the int32 range of "
            "s_in·s_w and is clipped (per-tensor weight scale too small for the bias)",
            PTQWarning,
            stacklevel=3,
        )
    q = np.clip(np.rint(b / scale.astype(np.float64)), -INT32_MAX, INT32_MAX)
    return q.astype(np.int32), scale


def _set_bias(
    g: Graph, node: onnx.NodeProto, k: int, b, scales: tuple[float, np.ndarray], w_dq, shape
) -> None:
    q, s = _quantize_bias(g, b, *scales, w_dq, node.name or node.op_type)
    base = node.input[k].replace("onnx::", "").strip("/")
    qi = g.add_init(q.reshape(shape), base + "_int32")
    si = g.add_init(s, base + "_scale")
    out = g.fresh(base + "_dq")  # no zero point input: 0 is the default
    g.nodes.append(helper.make_node(DQ, [qi, si], [out], g.fresh(out), axis=0))
    node.input[k] = out


@register_pass("bias_to_int32")
def bias_to_int32(g: Graph) -> int:
    """Float bias → ``DQ(int32 initializer, s_x·s_w per channel, zero point 0)`` for ``Conv``,
    ``Gemm`` and ``MatMul → Add`` whose input and weight come from ``DQ`` nodes."""
    done = 0
    for n in list(g.nodes):
        if n.op_type == "Conv" and len(n.input) > 2 and n.input[2]:
            b, w_dq = g.const(n.input[2]), g.producer.get(n.input[1])
            if b is None or b.dtype.kind != "f":
                continue
            s = _bias_scale(g, g.producer.get(n.input[0]), w_dq, b.size, 0)
            if s is not None:
                _set_bias(g, n, 2, b, s, w_dq, b.shape)
                done += 1
        elif n.op_type == "Gemm" and len(n.input) > 2 and n.input[2]:
            b, w_dq = g.const(n.input[2]), g.producer.get(n.input[1])
            if b is None or b.dtype.kind != "f" or g.attr(n, "beta", 1.0) != 1.0:
                continue
            if g.attr(n, "alpha", 1.0) != 1.0 or g.attr(n, "transA", 0):
                continue
            w = g.const(w_dq.input[0]) if w_dq is not None and w_dq.op_type == DQ else None
            if w is None or w.ndim != 2:
                continue
            axis = 0 if g.attr(n, "transB", 0) else 1
            nout = w.shape[axis]
            if b.size not in (1, nout):
                continue
            s = _bias_scale(g, g.producer.get(n.input[0]), w_dq, nout, axis)
            if s is not None:
                _set_bias(g, n, 2, np.broadcast_to(b.reshape(-1), (nout,)), s, w_dq, (nout,))
                done += 1
        elif n.op_type == "MatMul":
            add = g.only_user(n.output[0])
            w_dq = g.producer.get(n.input[1])
            w = g.const(w_dq.input[0]) if w_dq is not None and w_dq.op_type == DQ else None
            if add is None or add.op_type != "Add" or w is None or w.ndim != 2:
                continue
            k = 1 if add.input[0] == n.output[0] else 0
            b = g.const(add.input[k])
            if b is None or b.dtype.kind != "f" or b.size != w.shape[1] or b.ndim != 1:
                continue
            s = _bias_scale(g, g.producer.get(n.input[0]), w_dq, w.shape[1], 1)
            if s is not None:
                _set_bias(g, add, k, b, s, w_dq, b.shape)
                done += 1
    return done
