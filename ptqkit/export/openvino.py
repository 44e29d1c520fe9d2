"""OpenVINO as a second runtime of ptqkit's QDQ ONNX file (an optional dependency:
``pip install 'ptqkit[openvino]'``): :class:`OvModule` runs the file on OpenVINO's CPU plugin and
:func:`OvModule.precisions` reads, from the compiled model's execution graph
(``get_runtime_model()``, each node's runtime info ``layerType`` / ``runtimePrecision``), which
conv/linear layers run on integer kernels.

Which file: OpenVINO reads ``QuantizeLinear``/``DequantizeLinear`` as ``FakeQuantize`` and its
low-precision transformations run a conv/matmul in int8 when its weights are a signed int8
``DequantizeLinear`` and its input a ``FakeQuantize``; uint8 activations (ptqkit's default grid)
and int32 biases are fine. What is not: the ``uint8`` weights that ``weights="auto"`` writes for
ONNX Runtime on x86 CPUs without VNNI (measured here on the digits CNN: all 3 convs then ran in
``f32``). ``export_onnx(..., target="openvino")`` therefore writes the ONNX Runtime file with
``int8`` weights whatever the CPU (:func:`check_weights`); on a VNNI CPU it is the default file.

Precision: the CPU plugin runs the float parts of a model in bf16 on CPUs that have it (AVX-512
BF16 / AMX) unless ``INFERENCE_PRECISION_HINT`` says otherwise; :class:`OvModule` pins ``f32``
by default so that it is compared fairly with ONNX Runtime and the simulation
(``precision=None`` keeps OpenVINO's own choice, :attr:`OvModule.inference_precision` says
which ran).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ExportError

PIP = "pip install 'ptqkit[openvino]'"
#: execution-graph layer types that are a conv/linear
LAYER_TYPES = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")
INT_PRECISIONS = ("i8", "u8", "I8", "U8")


def check_weights(weights: str) -> str:
    """The weight container ``export_onnx(target="openvino")`` writes: ``int8`` (``"auto"`` or
    ``"int8"``); ``"uint8"`` is refused (OpenVINO runs such convs in float)."""
    if weights in ("auto", "int8"):
        return "int8"
    raise ExportError(
        f"target='openvino' needs int8 weights (OpenVINO runs a conv with uint8 weights in "
        f"float), got weights={weights!r}"
    )


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as e:
        raise ExportError(f"OpenVINO is not installed ({e}): {PIP}") from None
    return openvino


@dataclasses.dataclass(frozen=True)
class OvLayer:
    """One conv/linear node of OpenVINO's execution graph and the precision it ran in."""

    name: str
    layer_type: str
    precision: str

    @property
    def integer(self) -> bool:
        return self.precision in INT_PRECISIONS


@dataclasses.dataclass(frozen=True)
class OvPrecisions:
    """The conv/linear nodes of a compiled model (:meth:`OvModule.precisions`)."""

    layers: tuple[OvLayer, ...]
    inference_precision: str

    @property
    def int8(self) -> int:
        return sum(1 for layer in self.layers if layer.integer)

    @property
    def float_layers(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers if not layer.integer)

    def summary(self) -> str:
        kinds = sorted({f"{x.layer_type} {x.precision}" for x in self.layers})
        return (
            f"OpenVINO CPU: {self.int8}/{len(self.layers)} conv/linear on integer kernels "
            f"({', '.join(kinds)}); float parts in {self.inference_precision}"
        )


class OvModule(nn.Module):
    """An ONNX file compiled by OpenVINO for the CPU, called like the torch model it came from
    (tensors in, a tensor or a tuple of tensors out).

    Args:
        path: the ``.onnx`` file (:func:`~ptqkit.export.export_onnx`, ``target="openvino"``).
        precision: ``INFERENCE_PRECISION_HINT`` (default ``"f32"``; ``None``: OpenVINO's own
            choice, bf16 on CPUs that have it).
        threads: ``INFERENCE_NUM_THREADS`` (default: OpenVINO's).
        latency: ``PERFORMANCE_HINT=LATENCY`` (one stream; the setting for batch-1 timing).

    Raises:
        ExportError: no OpenVINO (names the pip package), no file, or a file it cannot compile.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        precision: str | None = "f32",
        threads: int | None = None,
        latency: bool = True,
    ) -> None:
        super().__init__()
        ov = _openvino()
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"no ONNX file at {self.path}")
        config: dict[str, Any] = {}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if latency:
            config["PERFORMANCE_HINT"] = "LATENCY"
        try:
            self.compiled = ov.Core().compile_model(str(self.path), "CPU", config)
        except Exception as e:
            raise ExportError(f"OpenVINO cannot compile {self.path}: {str(e)[:300]}") from e
        self._request = self.compiled.create_infer_request()

    @property
    def inference_precision(self) -> str:
        """The precision OpenVINO runs the float parts in (``f32``, ``bf16``, ``f16``)."""
        value = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        return str(value.to_string() if hasattr(value, "to_string") else value)

    def forward(self, *args: torch.Tensor) -> Any:
        feeds = [a.detach().cpu().float().numpy() if a.is_floating_point() else a.numpy()
                 for a in args]  # fmt: skip
        result = self._request.infer(feeds)
        outs = [torch.from_numpy(np.array(result[o])) for o in self.compiled.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def precisions(self) -> OvPrecisions:
        """The precision each conv/linear ran in, from the execution graph's runtime info."""
        layers = []
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            kind = _info(info, "layerType")
            if kind in LAYER_TYPES:
                layers.append(
                    OvLayer(op.get_friendly_name(), kind, _info(info, "runtimePrecision"))
                )
        return OvPrecisions(tuple(layers), self.inference_precision)


def _info(info: Any, key: str) -> str:
    if key not in info:
        return ""
    value = info[key]
    return str(value.astype(str)) if hasattr(value, "astype") else str(value)


__all__ = [
    "INT_PRECISIONS",
    "LAYER_TYPES",
    "PIP",
    "OvLayer",
    "OvModule",
    "OvPrecisions",
    "check_weights",
]
