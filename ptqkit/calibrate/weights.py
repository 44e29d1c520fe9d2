"""Weight quantization: each :class:`QuantLayer`'s float weight becomes integers with scales.

Ranges are per output channel (``layer.spec.axis``), per tensor, or group-wise
(``spec.group_size = g``): each group of ``g`` consecutive elements of an output channel's
flattened weight gets its own range, ``[out, ceil(K/g)]`` (a last, shorter group is padded with
zeros, which changes no range: see :func:`ptqkit.quant.primitives.group_rows`). Group-wise
``mse`` is a direct search per group (:func:`mse_groups`), not the histogram calibrator: a
4096x4096 weight has 131,072 groups of 128, and a histogram per group does not fit in memory.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import PTQConfig, QuantSpec
from ..info import PTQInfo
from ..quant.modules import QuantLayer, quant_layers
from ..quant.primitives import fake_quant, group_rows, qparams
from .calibrators import make_calibrator

#: clipping ratios ``α`` the group-wise mse search tries (1.0 = the min/max range)
MSE_RATIOS = tuple(1.0 - 0.04 * i for i in range(16))


def mse_groups(rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``rows`` ``[n, g]`` (one group each), the range ``α·[min, max]`` with ``α`` in
    :data:`MSE_RATIOS` (1.0 down to 0.4) minimizing ``Σ (w - fq(w; α))²`` over the row; ties
    keep the larger ``α``."""
    lo0 = rows.min(dim=1).values.clamp(max=0.0)
    hi0 = rows.max(dim=1).values.clamp(min=0.0)
    flat = dataclasses.replace(spec, group_size=None, axis=0)
    best = torch.full_like(lo0, float("inf"))
    lo, hi = lo0.clone(), hi0.clone()
    for a in MSE_RATIOS:
        s, z = qparams(lo0 * a, hi0 * a, flat)
        err = (fake_quant(rows, s, z, flat) - rows).pow(2).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        lo, hi = torch.where(better, lo0 * a, lo), torch.where(better, hi0 * a, hi)
    return lo, hi


def group_range(w: torch.Tensor, spec: QuantSpec, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Range of each group of ``spec.group_size`` consecutive elements of each row of ``w``
    (``[out, ...]``, flattened per row) by ``method``: ``(lo, hi)``, each ``[out, n]``."""
    if spec.group_size is None:
        raise ValueError("group_range needs a group-wise spec")
    rows = group_rows(w.detach().float(), spec.group_size)
    if method == "mse":
        lo, hi = mse_groups(rows, spec)
    else:
        cal = make_calibrator(method, axis=0)
        cal.observe(rows)
        lo, hi = cal.compute_range(dataclasses.replace(spec, group_size=None, axis=0))
    return lo.reshape(w.shape[0], -1), hi.reshape(w.shape[0], -1)


def weight_range(layer: QuantLayer, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Range of the layer's float weight by ``method`` (minmax | mse), per channel on the layer's
    output-channel axis (``layer.spec.axis``: 0, or 1 for a transposed conv), or per group
    (``[out, n]``) with a group-wise spec."""
    if layer.spec.group_size is not None:
        return group_range(layer.weight_fp, layer.spec, method)
    cal = make_calibrator(method, axis=layer.spec.axis if layer.spec.per_channel else None)
    cal.observe(layer.weight_fp)
    return cal.compute_range(layer.spec)


def quantize_weights(model: nn.Module, config: PTQConfig, info: PTQInfo) -> None:
    """Quantize the weights of every layer not already quantized."""
    for layer in quant_layers(model).values():
        layer.set_weight_range(*weight_range(layer, config.weight_calibration))
