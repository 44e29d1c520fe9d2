"""The modules a quantized copy is swapped into before ``torch.export``: each calls the standard
pt2e ops (``torch.ops.quantized_decomposed``) with ptqkit's exact integers, scales and zero points.

* :class:`QDQ` replaces an :class:`~ptqkit.quant.modules.ActQuant`:
  ``x̂ = dequantize_per_tensor(quantize_per_tensor(x, s, z, qmin, qmax, T), s, z, qmin, qmax, T)``
  with ``q = clamp(round(x · (1/s)) + z, qmin, qmax)`` and ``x̂ = (q - z)·s`` (per-channel
  activation grids use the ``_per_channel`` pair along the spec's axis).
* :class:`QDQLayer` replaces a :class:`~ptqkit.quant.modules.QuantLayer`: its integer weight is
  an integer constant of the program, dequantized by ``dequantize_per_channel`` (per-tensor:
  ``dequantize_per_tensor``) right before the wrapped Conv/Linear, the pattern ``convert_pt2e``
  produces and Inductor's and XNNPACK's int8 lowerings match.

Grids (``T`` the container dtype, :func:`~ptqkit.quant.primitives.storage_dtype`): symmetric
``b``-bit ``[-2^(b-1), 2^(b-1)-1]`` in ``int8`` (``b <= 8``), asymmetric ``[0, 2^b-1]`` in
``uint8``; a spec of fewer than 8 bits keeps the 8-bit container with the narrower
``quant_min``/``quant_max`` (the lowerings treat it as int8: exact, no faster). Wider grids use
``int16``/``uint16``/``int32`` containers (no integer kernel, exact in eager and Inductor).

The only numeric difference from the simulation is ``x · (1/s)`` (the op) instead of ``x / s``
(ptqkit, ONNX): the two round differently only where ``x/s`` lies within an ulp of a half
integer, moving that element by one step.
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

import torch
from torch import nn

from ...errors import ExportError
from ...quant.modules import ActQuant, QuantLayer
from ...quant.primitives import storage_dtype

#: where the ``quantized_decomposed`` ops are registered, first found wins (torch 2.13 ships
#: them in torch.ao; newer PyTorch moves pt2e quantization to torchao)
OP_MODULES = ("torch.ao.quantization.fx._decomposed", "torchao.quantization.pt2e")
#: the pip package that provides the ops when this PyTorch does not
PIP_PACKAGE = "torchao"


def qd_ops() -> Any:
    """``torch.ops.quantized_decomposed``, registered (importing the module that defines them),
    or :class:`ExportError` naming the pip package to install."""
    for name in OP_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        ops = torch.ops.quantized_decomposed
        if hasattr(ops, "quantize_per_tensor"):
            return ops
    raise ExportError(
        "torch.export with int8 Q/DQ needs the quantized_decomposed ops, which this PyTorch "
        f"does not provide: pip install {PIP_PACKAGE}"
    )


class QDQ(nn.Module):
    """Quantize → dequantize of one activation with ptqkit's grid (see the module docstring)."""

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, quant: ActQuant) -> None:
        super().__init__()
        spec = quant.spec
        self.label = quant.label
        self.active = quant.mode == "quant"
        self.qmin, self.qmax, self.dtype = spec.qmin, spec.qmax, storage_dtype(spec)
        self.per_channel = quant.scale.dim() > 0
        self.axis = spec.axis
        self.register_buffer("scale", quant.scale.detach().float().clone())
        self.register_buffer("zero_point", quant.zero_point.detach().to(torch.int64).clone())
        # per-tensor: Python numbers in the graph, as convert_pt2e writes them
        self.s = float(quant.scale) if not self.per_channel else 0.0
        self.z = int(quant.zero_point) if not self.per_channel else 0

    def extra_repr(self) -> str:
        return f"{self.label!r}, [{self.qmin}, {self.qmax}] {self.dtype}, active={self.active}"

    def forward(self, x: Any) -> Any:
        if not self.active or not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
            return x
        ops, out = qd_ops(), x.dtype
        grid = (self.qmin, self.qmax, self.dtype)
        if not self.per_channel:
            q = ops.quantize_per_tensor(x, self.s, self.z, *grid)
            return ops.dequantize_per_tensor(q, self.s, self.z, *grid, out_dtype=out)
        s, z, axis = self.scale, self.zero_point, self.axis % x.dim()
        q = ops.quantize_per_channel(x, s, z, axis, *grid)
        return ops.dequantize_per_channel(q, s, z, axis, *grid, out_dtype=out)


class QDQLayer(nn.Module):
    """A Conv/Linear computing with ``dequantize_per_channel(weight_int)`` (see the module
    docstring); a layer ptqkit kept in float computes with its float weight, unchanged."""

    weight_int: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor

    def __init__(self, ql: QuantLayer) -> None:
        super().__init__()
        spec = ql.spec
        self.name = ql.name
        self.quantized = ql.quantized
        self.layer = ql.layer  # taken over (swap_modules works on a copy)
        self.input_quant = QDQ(ql.input_quant) if ql.input_quant is not None else None
        self.qmin, self.qmax, self.dtype = spec.qmin, spec.qmax, storage_dtype(spec)
        self.axis = spec.axis
        self.per_channel = ql.weight_scale.dim() > 0
        self.register_buffer("weight_int", ql.weight_int.detach())
        self.register_buffer("weight_scale", ql.weight_scale.detach().float().clone())
        self.register_buffer("weight_zero_point", ql.weight_zero_point.detach().long().clone())
        if self.quantized:  # the float weight is not part of the program: the integers are
            self.layer._buffers["weight"] = None

    def extra_repr(self) -> str:
        kind = f"int [{self.qmin}, {self.qmax}] {self.dtype}" if self.quantized else "float"
        return f"{self.name!r}, {kind}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        if not self.quantized:
            return self.layer(x)
        ops, grid = qd_ops(), (self.qmin, self.qmax, self.dtype)
        if self.per_channel:
            w = ops.dequantize_per_channel(
                self.weight_int, self.weight_scale, self.weight_zero_point, self.axis, *grid
            )
        else:
            s, z = float(self.weight_scale), int(self.weight_zero_point)
            w = ops.dequantize_per_tensor(self.weight_int, s, z, *grid)
        if torch.is_floating_point(x) and x.dtype != w.dtype:  # (a .to would break the pattern)
            w = w.to(x.dtype)
        # the wrapped layer's own forward (a subclass, a "same padding" conv) runs with it
        self.layer._buffers["weight"] = w
        try:
            return self.layer(x)
        finally:
            self.layer._buffers["weight"] = None


def swap_modules(qmodel: nn.Module) -> nn.Module:
    """A copy of ``qmodel`` whose ``ActQuant``/``QuantLayer`` modules are :class:`QDQ` /
    :class:`QDQLayer` (``qmodel`` is left untouched)."""
    model = copy.deepcopy(qmodel)
    if isinstance(model, (ActQuant, QuantLayer)):
        return QDQ(model) if isinstance(model, ActQuant) else QDQLayer(model)
    _swap_children(model)
    return model


def _swap_children(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, QuantLayer):
            setattr(module, name, QDQLayer(child))
        elif isinstance(child, ActQuant):
            setattr(module, name, QDQ(child))
        else:
            _swap_children(child)


__all__ = ["OP_MODULES", "PIP_PACKAGE", "QDQ", "QDQLayer", "qd_ops", "swap_modules"]
