"""The modules a quantized model is made of.

* :class:`ActQuant` fake-quantizes one activation tensor. It has three modes: ``"observe"``
  (feeds a calibrator, returns its input), ``"quant"`` (fake-quantizes with its scale and zero
  point) and ``"off"`` (identity).
* :class:`QuantLayer` wraps a Conv/Linear (or a subclass, e.g. a "same padding" conv: its own
  ``forward`` is kept) and stores its weight as real integers (``weight_int``) with their scales
  and zero points. The float weight the wrapped layer computes with is the dequantized integer
  weight, kept as a non-persistent cache.

During ONNX export both emit ``QuantizeLinear``/``DequantizeLinear`` nodes (activations through
``torch.fake_quantize_*``, weights through :class:`_DequantizeLinear`), so the exported graph holds
int8 weight initializers and the same scales and zero points as the simulation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..config import QuantSpec
from ..errors import CalibrationError, ConfigError, ExportError, ModelError
from ..typed import optional_tensor_attr, tensor_attr
from . import state
from .dynamic import dynamic_fake_quant, export_linear, integer_linear
from .primitives import dequantize, fake_quant, qparams, quantize, weight_qparam_shape

#: Transposed convolutions: weight ``[in, out/groups, k...]``, output channels on axis 1.
TRANSPOSED_LAYERS = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
#: Convolutions (transposed included).
CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *TRANSPOSED_LAYERS)
#: Layer types whose weights ptqkit quantizes (subclasses included).
WEIGHT_LAYERS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    *TRANSPOSED_LAYERS,
)


def weight_axis(layer: nn.Module) -> int:
    """The output-channel axis of ``layer``'s weight: 1 for a transposed conv, else 0. For a
    grouped transposed conv, axis 1 holds ``out/groups`` channels: scale ``j`` serves the output
    channels ``j, j + out/groups, ...`` (one per group), which ONNX ``DequantizeLinear`` can say."""
    return 1 if isinstance(layer, TRANSPOSED_LAYERS) else 0


def out_channels(layer: nn.Module) -> int:
    """Output channels of a Conv / ConvTranspose / Linear (a transposed conv's weight holds
    ``out/groups`` of them on axis 1)."""
    if not isinstance(layer, WEIGHT_LAYERS):
        raise ModelError(f"{type(layer).__name__} has no output channels ptqkit knows")
    w = tensor_attr(layer, "weight")
    return int(w.shape[1] * layer.groups if isinstance(layer, TRANSPOSED_LAYERS) else w.shape[0])


class _DequantizeLinear(torch.autograd.Function):
    """``(q - z)·s`` along ``axis``; exported as ONNX ``DequantizeLinear``."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, axis: int
    ) -> torch.Tensor:
        return dequantize(q, s, z, axis)

    @staticmethod
    def symbolic(g: Any, q: Any, s: Any, z: Any, axis: int) -> Any:
        return g.op("DequantizeLinear", q, s, z, axis_i=axis)


def _no_script(module: nn.Module) -> nn.Module:
    """``torch.jit.script`` on a quantized model: refused in ptqkit's words (its quantizers run
    Python TorchScript cannot compile; the raw error was "Unknown type annotation")."""
    raise ModelError(
        f"torch.jit.script cannot compile a ptqkit-quantized model (its {type(module).__name__} "
        "modules run Python code TorchScript does not support); use "
        "torch.jit.trace(qmodel, example) or torch.export.export(qmodel, args), which give the "
        "same outputs at any batch size, or ptqkit.export_onnx"
    )


class ActQuant(nn.Module):
    """Fake-quantization of one activation tensor:
    ``x̂ = (clamp(round(x/s) + z, qmin, qmax) - z)·s``.

    With a dynamic spec (``spec.dynamic``) ``s`` and ``z`` come from each input at run time
    (:mod:`ptqkit.quant.dynamic`): such a quantizer never observes nor is ``calibrated`` (its
    buffers stay unused), and "quant" is its only mode besides "off"."""

    __prepare_scriptable__ = _no_script
    scale: torch.Tensor
    zero_point: torch.Tensor
    range: torch.Tensor

    def __init__(self, spec: QuantSpec, label: str = "") -> None:
        super().__init__()
        self.spec = spec
        self.label = label  # human-readable: which tensor this quantizes
        self.mode = "off"
        self.calibrator: Any = None
        self.calibrated = False
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("range", torch.zeros(2))  # the calibrated (lo, hi), for reports
        # mode and calibrated, written at state_dict() time: load_state_dict round-trips them
        self.register_buffer("ptq_flags", torch.zeros((), dtype=torch.uint8))

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # ``.half()`` / ``.double()``: the grid's scale and range stay float32 (moved only)
        return state.apply_keeping(self, ("scale", "range"), fn, recurse, super()._apply)

    def extra_repr(self) -> str:
        spec = self.spec
        dyn = f", dynamic per {'row' if spec.per_channel else 'tensor'}" if spec.dynamic else ""
        sym = spec.symmetric
        return f"{self.label!r}, bits={spec.bits}, symmetric={sym}{dyn}, mode={self.mode}"

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set scale and zero point from the range ``[lo, hi]`` (see :func:`qparams`)."""
        scale, zp = qparams(lo, hi, self.spec)
        dev = self.scale.device
        self.scale = scale.to(dev)
        self.zero_point = zp.to(dev)
        lo_t, hi_t = torch.as_tensor(lo).float(), torch.as_tensor(hi).float()
        self.range = torch.stack([lo_t.min(), hi_t.max()]).to(dev)
        self.calibrated = True
        self.mode = "quant"

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        self.ptq_flags = state.quantizer_flags(self)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        """Scale, zero point and range replaced, mode restored (:mod:`ptqkit.quant.state`)."""
        if state.prepare_quantizer(self, state_dict, prefix, args[-1]):
            super()._load_from_state_dict(state_dict, prefix, *args)
            state.finish_quantizer(self, state_dict, prefix, args[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # non-tensors pass through: fx sees a Python number (a float keyword input, `x.size(1)`)
        # as one more node, and the placement may put a quantizer on it
        if self.mode == "off" or not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
            return x
        if self.spec.dynamic:
            if self.mode == "observe":
                return x  # nothing to calibrate
            if torch.onnx.is_in_onnx_export():
                raise ExportError(
                    f"{self.label}: a dynamic quantizer is exported with the Linear it feeds "
                    "(MatMulInteger); this one feeds something else"
                )
            return dynamic_fake_quant(x, self.spec)
        if self.mode == "observe":
            try:
                self.calibrator.observe(x)
            except CalibrationError as e:
                raise type(e)(f"{self.label}: {e}") from None  # (NonFiniteDataError stays one)
            return x
        if torch.onnx.is_in_onnx_export():
            if self.scale.dim() == 0:
                return torch.fake_quantize_per_tensor_affine(
                    x,
                    self.scale.reshape(1),
                    self.zero_point.reshape(1),
                    self.spec.qmin,
                    self.spec.qmax,
                )
            return torch.fake_quantize_per_channel_affine(
                x, self.scale, self.zero_point, self.spec.axis, self.spec.qmin, self.spec.qmax
            )
        return fake_quant(x, self.scale, self.zero_point, self.spec)


class QuantLayer(nn.Module):
    """A Conv/Linear with integer weights ``weight_int`` and per-channel (or per-tensor) scales.

    ``input_quant`` (optional) fake-quantizes the layer's input: used when the model could not be
    traced and quantizers cannot be placed in the graph.
    """

    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor
    weight_int: torch.Tensor
    weight_fp: torch.Tensor
    __prepare_scriptable__ = _no_script

    def __init__(self, layer: nn.Module, spec: QuantSpec, name: str = "") -> None:
        super().__init__()
        if not isinstance(layer, WEIGHT_LAYERS):
            raise TypeError(f"QuantLayer wraps {WEIGHT_LAYERS}, got {type(layer).__name__}")
        if spec.per_channel and spec.axis != weight_axis(layer):
            spec = dataclasses.replace(spec, axis=weight_axis(layer))
        if spec.group_size is not None and isinstance(layer, TRANSPOSED_LAYERS):
            raise ConfigError(
                f"{name or type(layer).__name__}: group-wise weights (group_size="
                f"{spec.group_size}) are for Linear and Conv layers; a {type(layer).__name__}'s "
                "weight has its output channels on axis 1: give it a spec without group_size "
                "(a scope) or leave it float (skip)"
            )
        self.name = name
        self.spec = spec
        self.layer = layer
        self.input_quant: ActQuant | None = None
        if "weight" not in layer._parameters:
            raise TypeError(
                f"{name or type(layer).__name__}: its weight is not a plain Parameter "
                f"({type(getattr(layer, 'weight', None)).__name__}); remove parametrizations first"
            )
        w = tensor_attr(layer, "weight").detach()
        shape = weight_qparam_shape(w.shape, spec)
        self.register_buffer("weight_scale", torch.ones(shape, device=w.device))
        self.register_buffer(
            "weight_zero_point", torch.zeros(shape, dtype=torch.int32, device=w.device)
        )
        self.register_buffer("weight_int", torch.zeros(0, dtype=torch.int8, device=w.device))
        # the float weight (after BN folding / CLE): what the integers approximate
        self.register_buffer("weight_fp", w.clone(), persistent=False)
        # the weight the wrapped layer computes with: weight_fp, or (q - z)·s once quantized
        del layer.weight
        layer.register_buffer("weight", self.weight_fp, persistent=False)
        self.quantized = False
        # whether it computes with its integers, written at state_dict() time
        self.register_buffer("ptq_flags", torch.zeros((), dtype=torch.uint8, device=w.device))
        #: set when load_state_dict brought integers or a bias this float weight is not the
        #: reference of (a state dict carries the quantized model, not its float reference)
        self.float_stale = False

    @property
    def weight(self) -> torch.Tensor:
        """The weight the layer computes with (dequantized integers once quantized)."""
        return tensor_attr(self.layer, "weight")

    def set_float_weight(self, w: torch.Tensor) -> None:
        """Replace the float weight (before quantization: CLE, SmoothQuant, ...); the layer
        computes in float until quantized again."""
        self.weight_fp = w.detach().clone().to(self.weight_fp.device)
        self.float_stale = False
        self.use_float()

    def use_float(self) -> None:
        """Compute with the float weight (a layer kept in float, or a float reference pass)."""
        self.layer._buffers["weight"] = self.weight_fp
        self.select_bias("bias_fp")
        self.quantized = False

    def select_bias(self, which: str) -> None:
        """Bias correction keeps the float bias (buffer ``bias_fp``) and the corrected one
        (``bias_q``): compute with ``which`` when the layer has it (no-op otherwise)."""
        b = getattr(self, which, None)
        if isinstance(b, torch.Tensor):
            self.layer._parameters["bias"] = nn.Parameter(b, requires_grad=False)

    def set_weight_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Quantize the float weight with the range ``[lo, hi]`` (per channel or not)."""
        scale, zp = qparams(lo, hi, self.spec)
        self.set_quantized(quantize(self.weight_fp, scale, zp, self.spec), scale, zp)

    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> None:
        """Store integer weights ``q`` with ``scale``/``zp`` and compute with ``(q - z)·s``."""
        dev = self.weight_fp.device
        self.weight_int = q.to(dev)
        self.weight_scale = scale.to(dev, torch.float32)
        self.weight_zero_point = zp.to(dev, torch.int32)
        self.refresh()

    def refresh(self) -> None:
        """Compute with the dequantized integer weight ``(q - z)·s``."""
        # in the float weight's dtype: a half / double model computes in its own dtype
        self.layer._buffers["weight"] = dequantize(
            self.weight_int,
            self.weight_scale,
            self.weight_zero_point,
            self.spec.axis,
            self.spec.group_size,
        ).to(self.weight_fp.dtype)
        self.select_bias("bias_q")
        self.quantized = True

    @property
    def bias(self) -> torch.Tensor | None:
        return optional_tensor_attr(self.layer, "bias")

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        self.ptq_flags = state.layer_flags(self)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        """Integers, scales and zero points replaced, checked against this layer's spec, then
        computed with (:mod:`ptqkit.quant.state`); the wrapped layer's bias, a child, is loaded
        next into the bias this selects."""
        plan = state.prepare_layer(self, state_dict, prefix, args[-1])
        if plan is not None:
            super()._load_from_state_dict(state_dict, prefix, *args)
            state.finish_layer(self, state_dict, prefix, plan)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # ``.half()`` / ``.double()``: the weight scales stay float32 (moved only), so that the
        # dequantized weight, recomputed from them (a load), is the one the model computes with
        return state.apply_keeping(self, ("weight_scale",), fn, recurse, super()._apply)

    def extra_repr(self) -> str:
        state = "int" if self.quantized else "float"
        spec = self.spec
        gran = f"/g{spec.group_size}" if spec.group_size else ("/ch" if spec.per_channel else "")
        return f"{self.name!r}, w{spec.bits}{gran} {state}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        iq = self.input_quant
        if iq is not None and iq.spec.dynamic:  # part of the layer's integer matmul: it is
            if not self.quantized or iq.mode != "quant":  # float when the layer is
                return self.layer(x)
            if type(self.layer).forward is nn.Linear.forward:  # the runtime's integer sum
                if torch.onnx.is_in_onnx_export():
                    return export_linear(self, x, iq.spec)
                if not (x.requires_grad and torch.is_grad_enabled()):
                    return integer_linear(self, x, iq.spec)
        if iq is not None:
            x = iq(x)
        if self.quantized and torch.onnx.is_in_onnx_export():
            cache = self.layer._buffers["weight"]
            zp = self.weight_zero_point.to(self.weight_int.dtype)
            self.layer._buffers["weight"] = _DequantizeLinear.apply(
                self.weight_int, self.weight_scale, zp, self.spec.axis
            )
            try:
                return self.layer(x)
            finally:
                self.layer._buffers["weight"] = cache
        return self.layer(x)


def act_quants(model: nn.Module) -> dict[str, ActQuant]:
    """All :class:`ActQuant` modules of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ActQuant)}


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """All :class:`QuantLayer` modules of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


@contextmanager
def float_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily run ``model`` as the float network it approximates: activation quantizers
    off, layers on their float weights. Everything is restored on exit, even on error."""
    quants, layers = act_quants(model).values(), quant_layers(model).values()
    stale = [layer.name or type(layer.layer).__name__ for layer in layers if layer.float_stale]
    if stale:
        raise ModelError(
            f"the float reference of {', '.join(stale[:5])} is not known: load_state_dict "
            "brought integer weights or biases that this copy's float weights are not the "
            "reference of (a state dict holds the quantized model only); ptqkit.save and "
            "ptqkit.load keep both"
        )
    modes = [q.mode for q in quants]
    states = [
        (layer.quantized, layer.layer._buffers["weight"], layer.layer._parameters.get("bias"))
        for layer in layers
    ]
    try:
        for q in quants:
            q.mode = "off"
        for layer in layers:
            layer.layer._buffers["weight"] = layer.weight_fp
            layer.select_bias("bias_fp")
        yield
    finally:
        for q, m in zip(quants, modes):
            q.mode = m
        for layer, (quantized, w, b) in zip(layers, states):
            layer.layer._buffers["weight"] = w
            if "bias" in layer.layer._parameters:
                layer.layer._parameters["bias"] = b
            layer.quantized = quantized


def set_act_mode(model: nn.Module, mode: str) -> None:
    """Put every activation quantizer of ``model`` in ``mode`` (observe / quant / off)."""
    if mode not in ("observe", "quant", "off"):
        raise ValueError(f"unknown mode {mode!r}")
    for q in act_quants(model).values():
        if q.spec.dynamic:  # computes its range itself: nothing to observe, always ready
            q.mode = "off" if mode == "observe" else mode
        else:
            q.mode = "off" if mode == "quant" and not q.calibrated else mode
