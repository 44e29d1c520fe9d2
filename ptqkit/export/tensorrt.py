"""The ``target="tensorrt"`` profile of :func:`~ptqkit.export.export_onnx`: a QDQ ONNX file laid
out for TensorRT's explicit quantization (NVIDIA, "Working with Quantized Types", TensorRT
developer guide: Q/DQ placement recommendations).

TensorRT's Q/DQ are symmetric: ``int8``, zero point 0, per-tensor activations, per-channel
weights (output-channel axis). It fuses ``DQ → Conv/Gemm/MatMul [→ BN] [→ activation] [→ Add of a
DQ'd residual] → Q`` into one int8 kernel, so it wants Q/DQ on

* the inputs of every Conv / ConvTranspose / Gemm / MatMul (data and weight),
* both inputs of a residual ``Add`` (two tensors, no constant),

and **none** between a layer and the BatchNormalization / activation it fuses (a Q/DQ there
would cut the fusion and add a rounding the simulation did not have), and float biases (its
Q/DQ are 8-bit; it quantizes the bias itself). ptqkit's placement already quantizes after the
activation that follows a conv and folds BN; the profile differs from the ONNX Runtime one by
keeping the signed activation grid (no ``uint8_activations``) and the float bias (no
``bias_to_int32``), and is checked against those rules after export (:func:`violations`).

The activations must be quantized symmetric: ``PTQConfig(activations=QuantSpec(bits=8,
symmetric=True))``. A model quantized with ptqkit's default asymmetric activations is refused
(a zero point cannot be dropped without changing the numbers): quantize again with that config.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from ..errors import ExportError
from ..quant.modules import act_quants, quant_layers
from .graph import DQ, Graph, Q
from .openvino import check_weights

TARGETS = ("onnxruntime", "openvino", "tensorrt")
#: the ONNX Runtime passes the TensorRT profile leaves out
SKIPPED_PASSES = ("uint8_activations", "bias_to_int32")
LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: what TensorRT fuses into the layer before it: no Q/DQ may sit between them
FUSED = ("BatchNormalization", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid",
         "HardSwish", "Elu", "Selu", "Softplus", "PRelu")  # fmt: skip
SYMMETRIC_CONFIG = "PTQConfig(activations=QuantSpec(bits=8, symmetric=True))"


def passes(all_passes: list[str], target: str) -> list[str]:
    """The graph passes (:data:`ptqkit.export.passes.PASSES` names) ``target`` runs."""
    return [p for p in all_passes if target != "tensorrt" or p not in SKIPPED_PASSES]


def check_target(target: Any, fmt: str, weights: str, qmodel: Any) -> str:
    """Validate ``export_onnx``'s ``target`` with its other arguments; returns the weight
    container to use (TensorRT reads ``int8`` weights only)."""
    if target not in TARGETS:
        raise ExportError(f"target must be one of {TARGETS}, got {target!r}")
    if target == "openvino":  # the ONNX Runtime file, int8 weights on every CPU
        return check_weights(weights)
    if target != "tensorrt":
        return weights
    if fmt != "qdq":
        raise ExportError(f"target='tensorrt' writes format='qdq' only, got format={fmt!r}")
    if weights not in ("auto", "int8"):
        raise ExportError(f"target='tensorrt' needs int8 weights, got weights={weights!r}")
    check_model(qmodel)
    return "int8"


def check_model(qmodel: Any) -> None:
    """Raise :class:`ExportError` unless every quantizer of ``qmodel`` is on a TensorRT grid:
    symmetric 8-bit activations, symmetric weights of at most 8 bits."""
    for name, q in act_quants(qmodel).items():
        if q.mode == "quant" and (not q.spec.symmetric or q.spec.bits != 8):
            kind = "asymmetric" if not q.spec.symmetric else f"{q.spec.bits}-bit"
            raise ExportError(
                f"target='tensorrt' needs symmetric int8 activations (zero point 0), but "
                f"{name} ({q.label}) is {kind}: quantize the model again with {SYMMETRIC_CONFIG}"
            )
    for name, layer in quant_layers(qmodel).items():
        if layer.quantized and not layer.spec.symmetric:
            raise ExportError(
                f"target='tensorrt' needs symmetric weights (zero point 0); layer {name} has "
                "asymmetric ones: quantize with weights=QuantSpec(symmetric=True, per_channel=True)"
            )


def _int8_zero(g: Graph, node: onnx.NodeProto) -> bool:
    z = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return z is not None and z.dtype == np.int8 and not z.any()


def _from_dq(g: Graph, tensor: str) -> bool:
    p = g.producer.get(tensor)
    return p is not None and p.op_type == DQ


def violations(model: onnx.ModelProto) -> list[str]:
    """The places where ``model`` breaks TensorRT's explicit-quantization rules (module
    docstring), one line each; empty when it follows them all."""
    g, out = Graph(model), []
    for n in g.nodes:
        where = f"{n.op_type} {n.name or n.output[0]}"
        if n.op_type in (Q, DQ) and not _int8_zero(g, n):
            out.append(f"{where}: not int8 with zero point 0")
        elif n.op_type in LAYERS and _from_dq(g, n.input[1]):  # a quantized layer
            if not _from_dq(g, n.input[0]):
                out.append(f"{where}: its input is not quantized (no DQ)")
            if len(n.input) > 2 and n.input[2] and _from_dq(g, n.input[2]):
                out.append(f"{where}: its bias is quantized (TensorRT wants a float bias)")
        elif n.op_type == "Add" and all(g.const(i) is None for i in n.input):
            if not all(_from_dq(g, i) for i in n.input):
                out.append(f"{where}: a residual add with an input not quantized")
        elif n.op_type in FUSED and _from_dq(g, n.input[0]):
            dq = g.producer[n.input[0]]
            q = g.producer.get(dq.input[0])
            src = g.producer.get(q.input[0]) if q is not None else None
            if src is not None and src.op_type in (*LAYERS, "BatchNormalization"):
                out.append(f"{where}: Q/DQ between {src.op_type} and the {n.op_type} it fuses")
    return out


__all__ = ["SKIPPED_PASSES", "TARGETS", "check_model", "check_target", "passes", "violations"]
