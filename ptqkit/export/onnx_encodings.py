"""``export_onnx(..., format="fp32+encodings")``: a QDQ graph turned into its float twin plus
the encodings (scale, zero point, bits of every quantized tensor) that were removed, for
runtimes that quantize themselves."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from .graph import DQ, Graph, Q


def _encoding(scale: np.ndarray, zp: np.ndarray) -> dict[str, Any]:
    kind = {np.dtype(np.uint8): "uint8", np.dtype(np.int8): "int8", np.dtype(np.int32): "int32"}
    dtype = kind.get(zp.dtype, str(zp.dtype))
    return {
        "dtype": dtype,
        "bits": zp.dtype.itemsize * 8,
        "symmetric": bool(dtype != "uint8" and not zp.any()),
        "scale": scale.astype(np.float64).reshape(-1).tolist(),
        "zero_point": zp.astype(np.int64).reshape(-1).tolist(),
    }


def strip_qdq(model: onnx.ModelProto) -> dict[str, Any]:
    """Turn a QDQ model into its float twin, in place; return the encodings removed.

    ``DQ(integer initializer)`` (weights, int32 biases) becomes the dequantized float initializer
    (``(q - z)·s``, so quantizing it again with the recorded encoding gives back exactly ``q``);
    a ``Q → DQ`` pair on an activation disappears. Encodings: ``{"activations": {tensor: enc},
    "params": {initializer: enc}}`` with ``enc`` = dtype, bits, symmetric, scale and zero point
    (lists: one entry per channel along ``axis``), real = ``(q - zero_point)·scale``.
    """
    g = Graph(model)
    acts: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for dq in [n for n in g.nodes if n.op_type == DQ]:
        x, s = g.const(dq.input[0]), g.const(dq.input[1])
        z = g.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if s is None:
            continue
        if z is None:  # no zero point: 0 of the quantized tensor's type (uint8 by default)
            z = np.zeros(s.shape, x.dtype if x is not None else np.uint8)
        if x is not None:  # a parameter
            axis = g.attr(dq, "axis", 1) % max(x.ndim, 1)
            shape = [-1 if k == axis else 1 for k in range(x.ndim)] if s.size > 1 else []
            w = (x.astype(np.float64) - z.astype(np.float64).reshape(shape)) * s.astype(
                np.float64
            ).reshape(shape)
            name = g.add_init(w.astype(np.float32), dq.input[0].rsplit("_int", 1)[0] + "_fp32")
            params[name] = {**_encoding(s, z), "axis": axis if s.size > 1 else None}
            _replace(g, dq.output[0], name)
            continue
        q = g.producer.get(dq.input[0])
        if q is None or q.op_type != Q:
            continue
        acts[q.input[0]] = _encoding(s, z)
        _replace(g, dq.output[0], q.input[0])
    g.reindex()
    from .passes.tidy import prune

    prune(g)
    g.finish()
    return {"format": "ptqkit-encodings/1", "activations": acts, "params": params}


def _replace(g: Graph, old: str, new: str) -> None:
    """Make every reader of ``old`` read ``new`` (a graph output keeps its name via Identity)."""
    for n in g.users.get(old, []):
        for k, name in enumerate(n.input):
            if name == old:
                n.input[k] = new
    if old in g.outputs:
        g.nodes.append(onnx.helper.make_node("Identity", [new], [old], g.fresh(old + "_id")))


__all__ = ["strip_qdq"]
