"""``state_dict`` / ``load_state_dict`` of the quantized modules: the state dict round-trips the
quantized model.

``qB.load_state_dict(qA.state_dict())`` gives a ``qB`` that computes what ``qA`` does, bit for
bit: integer weights, scales and zero points (and activation scales, zero points and ranges)
are *replaced*, not copied into (their shapes are set by quantization: per-channel scales, an
empty ``weight_int`` before quantization), checked first against the receiving model's spec and
weight shapes; then each layer's dequantized weight ``(q - z)·s``, the float weight it computes
with, is recomputed from them. What is not a tensor rides in one ``uint8`` buffer per module,
``ptq_flags``, written when the state dict is taken: a layer's ``quantized`` (bit 0), a
quantizer's ``mode`` (bits 0-1: off / quant / observe) and ``calibrated`` (bit 3).

A state dict holds the quantized model, not its float reference (the float weight after BN
folding / CLE, the float bias beside a corrected one): where the loaded integers or biases differ
from the receiving layer's own, its float reference is no longer theirs, and the layer is marked
``float_stale`` (:func:`ptqkit.quant.modules.float_mode` refuses it: ptqkit.save / load keep
both). A mismatch (another bit width, per-tensor against per-channel, another shape, a scale not
finite and > 0, a value outside the grid) is reported the way ``load_state_dict`` reports a size
mismatch: a ``RuntimeError`` listing every entry.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import QuantSpec
from .primitives import storage_dtype, weight_qparam_shape

#: ``ActQuant.mode`` values by their code in ``ptq_flags`` (bits 0-1); bit 3: calibrated
MODES = ("off", "quant", "observe")
CALIBRATED = 8


def bad_qparams(s: torch.Tensor, z: torch.Tensor, spec: QuantSpec, dim: int) -> str:
    """Why ``(s, z)`` cannot be a scale and zero point of ``spec`` with ``dim`` dimensions
    (empty: they can)."""
    if s.shape != z.shape or s.dim() != dim:
        what = "per channel" if dim else "per tensor"
        return f"shapes {tuple(s.shape)}/{tuple(z.shape)}, but this model's spec is {what}"
    if not torch.is_floating_point(s) or not bool((torch.isfinite(s) & (s > 0)).all()):
        return "scale not finite and > 0"
    if torch.is_floating_point(z) or z.dtype == torch.bool:
        return f"zero point is {z.dtype}, not an integer"
    if z.numel() and (int(z.min()) < spec.qmin or int(z.max()) > spec.qmax):
        return f"zero point outside this model's grid [{spec.qmin}, {spec.qmax}]"
    return ""


def reshape_like(m: Any, names: tuple[str, ...], state: Any, prefix: str) -> None:
    """Give ``m``'s buffers ``names`` the shape of the incoming tensors, so that
    ``load_state_dict`` copies into them."""
    for n in names:
        t = state.get(prefix + n)
        own = m._buffers[n]
        if isinstance(t, torch.Tensor) and own is not None and own.shape != t.shape:
            m._buffers[n] = torch.empty(t.shape, dtype=own.dtype, device=own.device)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b.to(a.device)))


# -- activation quantizers -------------------------------------------------------------------------
def quantizer_flags(q: Any) -> torch.Tensor:
    code = MODES.index(q.mode) | (CALIBRATED if q.calibrated else 0)
    return torch.tensor(code, dtype=torch.uint8, device=q.scale.device)


def prepare_quantizer(q: Any, state: Any, prefix: str, errors: list[str]) -> bool:
    """Before the copy: check and reshape; ``False`` (an error recorded) to stop."""
    s, z = state.get(prefix + "scale"), state.get(prefix + "zero_point")
    if isinstance(s, torch.Tensor) and isinstance(z, torch.Tensor):
        bad = bad_qparams(s, z, q.spec, 1 if q.spec.per_channel and not q.spec.dynamic else 0)
        if bad:
            errors.append(f"{prefix}scale/zero_point: {bad} ({q.label})")
            return False
        reshape_like(q, ("scale", "zero_point", "range"), state, prefix)
    return True


def finish_quantizer(q: Any, state: Any, prefix: str, errors: list[str]) -> None:
    """After the copy: mode and calibrated from the loaded flags."""
    if prefix + "ptq_flags" not in state:
        return
    code = int(q.ptq_flags)
    mode = MODES[code & 3] if code & 3 < len(MODES) else "?"
    if mode not in ("off", "quant"):
        errors.append(f"{prefix}ptq_flags: a quantizer in mode {mode!r} cannot be loaded")
        return
    q.mode, q.calibrated = mode, bool(code & CALIBRATED)


# -- quantized layers ------------------------------------------------------------------------------
def layer_flags(layer: Any) -> torch.Tensor:
    return torch.tensor(int(layer.quantized), dtype=torch.uint8, device=layer.weight_fp.device)


def bad_weights(layer: Any, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> str:
    """Why ``(q, s, z)`` cannot be ``layer``'s weights (empty: they can)."""
    spec, shape = layer.spec, tuple(layer.weight_fp.shape)
    if q.numel() and tuple(q.shape) != shape:
        return f"shape {tuple(q.shape)}, but this layer's weight is {shape}"
    if q.numel() and q.dtype != storage_dtype(spec):
        return f"{q.dtype}, but this layer's {spec.bits}-bit spec stores {storage_dtype(spec)}"
    if q.numel() and (int(q.min()) < spec.qmin or int(q.max()) > spec.qmax):
        return f"integers outside this layer's grid [{spec.qmin}, {spec.qmax}]"
    want = weight_qparam_shape(shape, spec)
    bad = bad_qparams(s, z, spec, len(want))
    if not bad and tuple(s.shape) != want:
        bad = f"scales of shape {tuple(s.shape)}, but this layer's spec has {want}"
    return bad


def prepare_layer(
    layer: Any, state: Any, prefix: str, errors: list[str]
) -> tuple[bool, bool] | None:
    """Before the copy: check the incoming weights and reshape the buffers. ``None`` (an error
    recorded) to stop, else ``(quantized, changed)`` for :func:`finish_layer` (``changed``: the
    integers, scales, zero points or the bias differ from the layer's own). ``(False,
    False)`` with no integers in ``state`` (ptqkit.load restores them itself)."""
    q = state.get(prefix + "weight_int")
    s, z = state.get(prefix + "weight_scale"), state.get(prefix + "weight_zero_point")
    if not (isinstance(q, torch.Tensor) and isinstance(s, torch.Tensor)):
        return False, False
    if not isinstance(z, torch.Tensor):
        return False, False
    bad = bad_weights(layer, q, s, z)
    if bad:
        errors.append(f"{prefix}weight_int/scale/zero_point: {bad} ({layer.name})")
        return None
    flags = state.get(prefix + "ptq_flags")
    quantized = bool(int(flags)) if isinstance(flags, torch.Tensor) else bool(q.numel())
    b = state.get(prefix + "layer.bias")
    own = [getattr(layer, n, None) for n in ("bias", "bias_fp", "bias_q")]
    changed = not (
        same(q, layer.weight_int)
        and same(s, layer.weight_scale)
        and same(z, layer.weight_zero_point)
        and (b is None or any(isinstance(o, torch.Tensor) and same(b, o) for o in own))
    )
    layer.weight_int = torch.empty(q.shape, dtype=q.dtype, device=layer.weight_fp.device)
    reshape_like(layer, ("weight_scale", "weight_zero_point"), state, prefix)
    return quantized, changed


def finish_layer(layer: Any, state: Any, prefix: str, plan: tuple[bool, bool]) -> None:
    """After the copy: compute with the loaded integers (or in float, as the saved layer did)."""
    if prefix + "weight_int" not in state:
        return
    quantized, changed = plan
    layer.float_stale = layer.float_stale or changed
    if quantized:
        layer.refresh()
    else:
        layer.use_float()


def apply_keeping(m: Any, names: tuple[str, ...], fn: Any, recurse: bool, apply: Any) -> Any:
    """``nn.Module._apply(fn)`` (``.to``, ``.half()``, ``.cuda()``, ...) on ``m`` with its
    buffers ``names`` moved to where ``fn`` sends tensors but kept in their dtype: quantization
    parameters are float32 whatever the dtype the model computes in (a ``.half()`` scale would
    round and no longer be the scale the integers were made with)."""
    kept = {n: m._buffers[n] for n in names if m._buffers.get(n) is not None}
    for n in kept:
        m._buffers[n] = None  # _apply skips None buffers
    try:
        out = apply(fn, recurse)
    finally:
        for n, t in kept.items():
            m._buffers[n] = t.to(fn(t).device)
    return out
