"""How many bytes a model needs in storage (:func:`size_bytes`): the size columns of
:func:`ptqkit.evaluate` and the benchmarks."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _tensor_bytes(t: torch.Tensor, bits: int | None = None) -> int:
    if bits is None:
        return t.numel() * t.element_size()
    return math.ceil(t.numel() * bits / 8)


def size_bytes(model: Any) -> int | None:
    """Bytes a model needs in storage.

    * an object with a ``size_bytes`` attribute (an int, or a method returning one), such as
      an ONNX Runtime session wrapper: that value;
    * otherwise an ``nn.Module``: every tensor of its state dict (parameters and persistent
      buffers; non-persistent caches such as the dequantized weights of a quantized layer are
      not stored), each shared tensor counted once. A quantized layer's integer weights count
      at their bit width (``ceil(n·bits/8)`` bytes: at 8 bits, their real ``int8`` storage;
      below 8 bits the packed size a deployment format stores — ptqkit's own file keeps one
      byte per value);
      scales, zero points, float biases and activation ranges count at their dtype;
    * otherwise ``None``.
    """
    size = getattr(model, "size_bytes", None)
    if size is not None:
        return int(size() if callable(size) else size)
    if not isinstance(model, nn.Module):
        return None
    from ..quant.modules import quant_layers

    bits = {f"{n}.weight_int": m.spec.bits for n, m in quant_layers(model).items()}
    total, seen = 0, set()
    for key, t in model.state_dict(keep_vars=False).items():
        if key.endswith(".ptq_flags") and t.dtype == torch.uint8 and t.dim() == 0:
            continue  # a quantized module's state (quant.state), not what a deployment stores
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        total += _tensor_bytes(t, bits.get(key))
    return total


__all__ = ["size_bytes"]
