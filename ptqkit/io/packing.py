"""Integer weights of 4 bits or fewer packed two per byte in a saved file.

A ``b``-bit integer ``q`` (``b <= 4``) of grid ``[qmin, qmax]`` is stored as the nibble
``u = q - qmin`` in ``[0, 15]``; element ``2i`` goes to the low nibble of byte ``i``, element
``2i + 1`` to its high nibble (the order ONNX uses for int4), a last odd element with a zero high
nibble: ``ceil(n / 2)`` bytes for ``n`` weights instead of ``n``. The file's layer metadata says
``"packed": "nibbles"`` and the weight's ``shape``; :func:`unpack_layers` restores the
``int8``/``uint8`` tensor :class:`~ptqkit.quant.modules.QuantLayer` holds, bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..config import QuantSpec
from ..errors import LoadError
from ..quant.primitives import storage_dtype

#: the packing name in a layer's metadata
NIBBLES = "nibbles"


def packs(spec: QuantSpec) -> bool:
    """Whether weights of ``spec`` are stored packed (4 bits or fewer)."""
    return spec.bits <= 4


def pack(q: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``q`` (any shape, inside the grid of ``spec``) as ``ceil(n/2)`` uint8 bytes."""
    u = (q.reshape(-1).to(torch.int16) - spec.qmin).to(torch.uint8)
    if u.numel() % 2:
        u = torch.cat([u, torch.zeros(1, dtype=torch.uint8)])
    return u[0::2] | (u[1::2] << 4)


def unpack(packed: torch.Tensor, spec: QuantSpec, shape: tuple[int, ...]) -> torch.Tensor:
    """The integers :func:`pack` stored, in ``shape`` and the storage dtype of ``spec``."""
    n = math.prod(shape)
    u = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:n]
    return (u.to(torch.int16) + spec.qmin).to(storage_dtype(spec)).reshape(shape)


def pack_layers(
    tensors: dict[str, torch.Tensor], layers: dict[str, Any], meta: dict[str, dict[str, Any]]
) -> None:
    """Replace each packable layer's ``weight_int`` in ``tensors`` by its packed bytes and say
    so in its metadata ``meta[name]``."""
    for name, layer in layers.items():
        key = f"{name}.weight_int"
        q = tensors.get(key)
        if q is None or not q.numel() or not packs(layer.spec):
            continue
        tensors[key] = pack(q, layer.spec)
        meta[name]["packed"] = NIBBLES
        meta[name]["shape"] = list(q.shape)


def unpack_layers(
    path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, dict[str, Any]]
) -> None:
    """Undo :func:`pack_layers` on a file's tensors (a bad entry is a :class:`LoadError`)."""
    for name, m in meta.items():
        if not isinstance(m, dict) or "packed" not in m:
            continue
        key = f"{name}.weight_int"
        t, shape = tensors.get(key), m.get("shape")
        if m["packed"] != NIBBLES or not isinstance(shape, list) or t is None:
            raise LoadError(f"{path}: {key}: unknown packing {m['packed']!r} or no shape")
        try:
            spec = QuantSpec.from_dict(m["spec"])
        except Exception as e:
            raise LoadError(f"{path}: {name}: invalid spec in the file: {e}") from None
        n = math.prod(shape)
        if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != -(-n // 2) or not packs(spec):
            raise LoadError(
                f"{path}: {key}: {t.dtype} {tuple(t.shape)} is not {n} packed "
                f"{spec.bits}-bit weights (an edited or corrupt file)"
            )
        tensors[key] = unpack(t, spec, tuple(shape))


__all__ = ["NIBBLES", "pack", "pack_layers", "packs", "unpack", "unpack_layers"]
