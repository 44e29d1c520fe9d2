"""Dynamic activations in the exported ONNX graph: each Linear whose input is quantized at run
time (:mod:`ptqkit.quant.dynamic`) becomes an integer matmul, ``MatMulInteger``, which ONNX
Runtime runs on its MLAS integer kernels:

* 8-bit asymmetric per tensor: ``DynamicQuantizeLinear → MatMulInteger → Cast → Mul(s_x·s_w)``,
  the graph ONNX Runtime's own ``quantize_dynamic`` writes (and fuses into
  ``DynamicQuantizeMatMul``); ``DynamicQuantizeLinear`` equals the simulation bit for bit.
* per row (per token), symmetric, or fewer bits: ONNX Runtime's ``DynamicQuantizeLinear`` is
  per-tensor uint8 only, and its ``MatMulInteger`` takes a scalar activation zero point, so the
  row ranges are computed with ``ReduceMin/ReduceMax`` and the row zero points enter after the
  matmul, in int32 (exact): ``(A - z_r·c)·s_r·s_w`` with ``c[n] = Σ_k (q_w[n,k] - z_w[n])`` a
  constant. Activations always go in as uint8 (a signed grid shifted by 128), the operand the
  fast u8×s8 / u8×u8 kernels take.

The simulation computes ``(q_x - z)·s`` times the dequantized weight in float32; the exported
graph sums the same integers exactly in int32: outputs differ by float rounding only (measured
in tests/export/test_dynamic_onnx.py).

On x86 without VNNI the u8×s8 kernels saturate (:mod:`ptqkit.export.weights`): there the weights
of ``MatMulInteger`` are stored as uint8 with zero point + 128 (:func:`matmul_weights_to_uint8`),
exact since ``c[n]`` is unchanged by the shift.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ExportError

MATMUL_INTEGER = "MatMulInteger"


def check_dynamic(quants: dict[str, Any], target: str, format: str) -> int:
    """Refuse the dynamic quantizers an export cannot write (:class:`ExportError`); returns how
    many there are."""
    dyn = {n: q for n, q in quants.items() if q.spec.dynamic and q.mode == "quant"}
    if not dyn:
        return 0
    name, q = next(iter(dyn.items()))
    if target != "onnxruntime" or format != "qdq":
        raise ExportError(
            f"{len(dyn)} activation quantizer(s) are dynamic (e.g. {name}, {q.label}): their "
            f"scales are computed at run time, which only format='qdq', "
            f"target='onnxruntime' writes (MatMulInteger); got format={format!r}, "
            f"target={target!r}. Quantize with static activations for this export"
        )
    for name, q in dyn.items():
        if q.spec.bits > 8:
            raise ExportError(
                f"activation quantizer {name} ({q.label}) is dynamic with {q.spec.bits} bits; "
                "MatMulInteger takes 8-bit integers at most"
            )
    return len(dyn)


def matmul_weights_to_uint8(model: onnx.ModelProto) -> int:
    """The int8 weight initializers of ``MatMulInteger`` (input 1, zero point input 3) stored as
    uint8 + 128; returns how many were converted. An initializer something else reads too is
    copied (the other reader keeps its int8)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    done, copied = 0, set()
    for n in graph.node:
        if n.op_type != MATMUL_INTEGER or n.input[1] not in inits:
            continue
        if inits[n.input[1]].data_type != onnx.TensorProto.INT8:
            continue
        if len(n.input) < 4 or not n.input[3]:
            raise ExportError(f"{n.name}: a MatMulInteger without a weight zero point")
        for k in (1, 3):
            t = inits.get(n.input[k])
            if t is None:
                raise ExportError(f"{n.name}: weight zero point {n.input[k]!r} is not constant")
            arr = (numpy_helper.to_array(t).astype(np.int16) + 128).astype(np.uint8)
            name = n.input[k] if readers[n.input[k]] == 1 else f"{n.input[k]}_u8_{done}"
            new = numpy_helper.from_array(arr, name)
            if name == n.input[k]:
                t.CopyFrom(new)
            else:
                graph.initializer.append(new)
                copied.add(n.input[k])
                n.input[k] = name
        done += 1
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name in copied and t.name not in read]:
        graph.initializer.remove(t)  # every reader took a uint8 copy
    return done


def integer_matmuls(model: onnx.ModelProto) -> int:
    """How many ``MatMulInteger`` nodes the graph has (one per dynamic Linear)."""
    return sum(n.op_type == MATMUL_INTEGER for n in model.graph.node)


__all__ = ["check_dynamic", "integer_matmuls", "matmul_weights_to_uint8"]
