"""The weight container of the exported graph: ``int8`` or ``uint8``, chosen so that ONNX
Runtime's integer kernels compute exactly what the simulation computes on the deployment CPU.

An integer kernel accumulates ``Σ_k x_k·w_k`` (``x`` uint8 activations, ``w`` weights) in int32.
On x86 CPUs *without* VNNI (AVX2 and AVX-512 without ``avx512_vnni``), ONNX Runtime's u8×s8
kernels use ``vpmaddubsw``, which adds two adjacent products in a **saturating int16**:

    sat16(x₁·w₁ + x₂·w₂),   |x₁·w₁ + x₂·w₂| ≤ 255·(|w₁| + |w₂|) ≤ 255·255 = 65,025 > 32,767

so a full-range int8 weight (``|w| ≤ 127``) next to large activations is silently clipped
(measured here on an AVX2 EPYC with onnxruntime 1.32: up to 33 output steps on a small CNN, top-1
agreement with the simulation 90%). ONNX Runtime's documentation names the two remedies: 7-bit
weights (``reduce_range``, which costs accuracy) or u8×u8 kernels. The u8×u8 kernels widen to
int16 before multiplying (``vpmaddwd``) and are exact, so ptqkit stores the *same* weights as
``uint8`` with zero point ``z + 128``:

    w_u8 = w_s8 + 128,  z_u8 = z_s8 + 128   ⇒   (w_u8 - z_u8)·s = (w_s8 - z_s8)·s

which is exact (no value changes). VNNI (``vpdpbusd``), AMX and Arm's dot-product instructions
accumulate in int32 directly, so ``int8`` is exact there and the faster choice.

``export_onnx(..., weights="auto")`` picks ``uint8`` when the CPU running the export lacks VNNI on
x86 (a model deployed on another CPU can be exported with ``weights="int8"`` or ``"uint8"``
explicitly); :func:`ptqkit.export.parity` measures what the runtime really computes.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ExportError
from .graph import DQ

WEIGHT_DTYPES = ("auto", "int8", "uint8")
#: x86 flags (``/proc/cpuinfo``) of instructions that accumulate u8×s8 products in int32 exactly
EXACT_INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8"})
_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's feature flags, or ``None`` where they cannot be read (not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


@lru_cache(maxsize=1)
def int8_dot_is_exact() -> bool:
    """Whether ONNX Runtime's u8×s8 integer kernels are exact on this CPU (see the module
    docstring). x86 without readable flags counts as not exact (the safe answer)."""
    if platform.machine().lower() not in _X86:
        return True  # Arm's sdot/udot and smmla accumulate in int32
    flags = _cpu_flags()
    return flags is not None and bool(flags & EXACT_INT8_FLAGS)


def resolve_weight_dtype(weights: str) -> str:
    """``"auto"`` → ``"int8"`` where u8×s8 is exact on this CPU, else ``"uint8"``."""
    if weights not in WEIGHT_DTYPES:
        raise ExportError(f"weights must be one of {WEIGHT_DTYPES}, got {weights!r}")
    if weights == "auto":
        return "int8" if int8_dot_is_exact() else "uint8"
    return weights


def _eligible(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """A ``DequantizeLinear`` of an int8 initializer with a constant int8 (or absent) zero point."""
    if node.op_type != DQ or node.input[0] not in inits:
        return False
    if inits[node.input[0]].data_type != onnx.TensorProto.INT8:
        return False
    zp = node.input[2] if len(node.input) >= 3 else ""
    return not zp or (zp in inits and inits[zp].data_type == onnx.TensorProto.INT8)


def weights_to_uint8(model: onnx.ModelProto) -> int:
    """Store every int8 weight of ``model`` (an int8 initializer read by ``DequantizeLinear``) as
    uint8 with its zero point shifted by 128; returns how many were converted. Exact.

    An initializer read only by such nodes is converted in place (its name is kept); one that
    something else reads too gets a uint8 twin, so that the other reader is unchanged."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = [n for n in graph.node if _eligible(n, inits)]
    ours = {(id(n), k) for n in nodes for k in (0, 2)}
    foreign = {
        name
        for n in graph.node
        for k, name in enumerate(n.input)
        if name in inits and (id(n), k) not in ours
    } | {o.name for o in graph.output}
    converted: dict[str, str] = {}

    def shifted(arr: np.ndarray, name: str) -> onnx.TensorProto:
        return numpy_helper.from_array((arr.astype(np.int16) + 128).astype(np.uint8), name)

    def to_uint8(name: str) -> str:
        if name not in converted:
            arr = numpy_helper.to_array(inits[name])
            if name in foreign:
                new = name + "_u8"
                while new in inits:
                    new += "_"
                inits[new] = shifted(arr, new)
                graph.initializer.append(inits[new])
                converted[name] = new
            else:
                inits[name].CopyFrom(shifted(arr, name))
                converted[name] = name
        return converted[name]

    for i, node in enumerate(nodes):
        node.input[0] = to_uint8(node.input[0])
        if len(node.input) >= 3 and node.input[2]:
            node.input[2] = to_uint8(node.input[2])
            continue
        scale = inits.get(node.input[1])  # absent zero point: int8 0, so uint8 128
        shape = numpy_helper.to_array(scale).shape if scale is not None else ()
        name = f"{node.input[0]}.zero_point_u8_{i}"
        graph.initializer.append(shifted(np.zeros(shape, np.int8), name))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
    return len(nodes)


__all__ = ["WEIGHT_DTYPES", "int8_dot_is_exact", "resolve_weight_dtype", "weights_to_uint8"]
