"""Scale-and-bias correction (``bias_correction="affine"``): per output channel ``c`` of a
quantized layer, the affine map ``ỹ_c ← a_c·ỹ_c + b_c`` of its output that best matches the
float network's output ``y_c`` in the least-squares sense, over the calibration data:

    a_c = Cov(ỹ_c, y_c) / Var(ỹ_c),      b_c = E[y_c] - a_c·E[ỹ_c]

(``a_c = 1`` is empirical bias correction, Nagel et al. 2019; solving for both is the
closed-form, per-channel special case of the layer-wise output-MSE objective of AdaQuant,
Hubara et al. 2021, restricted to each channel's scale and bias). As in bias correction, the
layers are corrected in execution order, each on the outputs of the already corrected quantized
network, so a layer also absorbs what its *input* lost upstream. Why the scale matters: mean
matching alone cannot undo a *gain* loss (activation clipping, quantization noise through
ReLU-like kinks pushes bias corrections down); on EfficientNet-Lite0 empirical bias correction
leaves the logits ~8% too small (KL 0.026) where this gives KL 0.003 (bench/ONEPASS.md).

It costs nothing at inference and keeps the integer weights: ``a_c`` multiplies the channel's
weight scale (per-channel weights; a per-tensor weight scale cannot take it, ``a = 1`` there:
plain bias correction) and the corrected bias becomes ``a_c·b̃_c + b_c``. ``Cov`` and ``Var``
come from a few sampled positions per image (:class:`ptqkit.correct.means.FloatMeans` with
``rows``), the means from all of them. ``a`` is kept within ``[1/2, 2]``: beyond, the channel
carries too little signal to rescale, and is only re-centred.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..quant.modules import QuantLayer, out_channels
from ..sync import active, add_up
from ..typed import tensor_attr
from .means import position_rows

#: the bounds of a channel's scale correction
SCALE_BOUNDS = (0.5, 2.0)
_KEYS = ("q", "y", "qq", "qy")


def can_scale(layer: QuantLayer) -> bool:
    """Whether ``layer``'s weight scale is one per output channel (so an output channel can
    be rescaled by its scale alone): per-channel weights (on the output-channel axis,
    :func:`ptqkit.quant.modules.weight_axis`), not a grouped transposed conv (whose scales
    are shared by ``groups`` output channels)."""
    per_channel = bool(layer.spec.per_channel)
    return per_channel and layer.weight_scale.numel() == out_channels(layer.layer)


class Paired:
    """Running sums over the sampled positions of one layer's ``channels`` outputs:
    ``Σỹ, Σy, Σỹ², Σỹy`` per channel (float64) and the count (zeros on a rank without data:
    every rank sums the same entries)."""

    def __init__(self, channels: int) -> None:
        self.sums: dict[str, Any] = {k: torch.zeros(channels, dtype=torch.float64) for k in _KEYS}
        self.sums["n"] = 0
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # per batch, for the check

    def add(self, q: torch.Tensor, y: torch.Tensor) -> None:
        """``q``, ``y``: ``[N, k, C]`` (the quantized and float outputs at the same rows)."""
        self.rows.append((q.detach().float().cpu(), y.detach().float().cpu()))
        q, y = q.reshape(-1, q.shape[-1]).double().cpu(), y.reshape(-1, y.shape[-1]).double().cpu()
        new = {"q": q.sum(0), "y": y.sum(0), "qq": (q * q).sum(0), "qy": (q * y).sum(0)}
        for k, v in new.items():
            self.sums[k] = self.sums[k] + v
        self.sums["n"] += q.shape[0]

    def over_ranks(self, tag: str) -> None:
        """Under ``torch.distributed``, the sums over every rank's rows."""
        if active():
            self.sums = add_up(tag, self.sums)

    def scale(self) -> torch.Tensor | None:
        """``a = Cov(ỹ, y) / Var(ỹ)`` per channel, within :data:`SCALE_BOUNDS`; 1 where the
        quantized output hardly varies. ``None`` without rows."""
        n = float(self.sums["n"])
        if n < 2:
            return None
        mq, my = self.sums["q"] / n, self.sums["y"] / n
        var = self.sums["qq"] / n - mq * mq
        cov = self.sums["qy"] / n - mq * my
        ok = var > 1e-12 * (mq * mq + 1.0)
        a = torch.where(ok, cov / torch.where(ok, var, 1.0), 1.0)
        return a.clamp(*SCALE_BOUNDS)


def pair(
    paired: Paired,
    outputs: Iterable[torch.Tensor],
    picks: list[tuple[torch.Tensor, torch.Tensor]],
    layer: nn.Module,
) -> None:
    """Add to ``paired`` the quantized ``outputs`` (one per recorded batch, in order) at the
    positions the float pass sampled (``picks``: per batch, positions and float rows)."""
    for y_q, (idx, y_f) in zip(outputs, picks, strict=False):
        paired.add(position_rows(y_q.detach(), layer)[:, idx.to(y_q.device)], y_f)


def bias_q(layer: QuantLayer) -> torch.Tensor:
    """The layer's corrected bias ``bias_q``, created from its float bias (zeros if it has
    none) on first use; the float one is kept as ``bias_fp`` so that the float reference
    (``float_mode``) and layers put back in float compute without the correction."""
    if getattr(layer, "bias_q", None) is None:
        w = layer.weight_fp
        b = layer.layer.bias
        fp = b.detach().clone() if b is not None else torch.zeros(out_channels(layer.layer))
        fp = fp.to(w.device, w.dtype)
        layer.register_buffer("bias_fp", fp, persistent=False)
        layer.register_buffer("bias_q", fp.clone(), persistent=False)
    return tensor_attr(layer, "bias_q")


def add_to_bias(layer: QuantLayer, delta: torch.Tensor) -> None:
    """``bias_q ← bias_q + delta`` (:func:`bias_q`)."""
    delta = delta.to(layer.weight_fp.device, torch.float32)
    old = bias_q(layer)  # summed in float32, kept in the layer's dtype (half...)
    layer.bias_q = (old.float() + delta).to(old.dtype)
    layer.select_bias("bias_q" if layer.quantized else "bias_fp")


def rescale(layer: QuantLayer, a: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``layer`` compute ``a·ỹ + shift`` per output channel: its weight scale times ``a``
    (the integer weights unchanged) and its quantized bias ``a·b̃ + shift``. The float bias
    is kept as ``bias_fp`` (the float reference and fallback compute without the change)."""
    dev = layer.weight_scale.device
    old = bias_q(layer)
    a64 = a.to(old.device, torch.float64)
    layer.bias_q = (old.double() * a64 + shift.to(old.device, torch.float64)).to(old.dtype)
    shape = layer.weight_scale.shape
    layer.weight_scale = (layer.weight_scale.double() * a.to(dev).double().reshape(shape)).float()
    layer.refresh()  # the dequantized weight (q - z)·s·a, and bias_q selected


__all__ = ["SCALE_BOUNDS", "Paired", "add_to_bias", "bias_q", "can_scale", "pair", "rescale"]
