"""Weight quantization: each :class:`QuantLayer`'s float weight becomes integers with scales."""

from __future__ import annotations

from torch import nn

from ..config import PTQConfig
from ..info import PTQInfo
from ..quant.modules import QuantLayer, quant_layers
from .calibrators import make_calibrator


def weight_range(layer: QuantLayer, method: str):
    """Range of the layer's float weight by ``method`` (minmax | mse), per channel on the layer's
    output-channel axis (``layer.spec.axis``: 0, or 1 for a transposed conv)."""
    cal = make_calibrator(method, axis=layer.spec.axis if layer.spec.per_channel else None)
    cal.observe(layer.weight_fp)
    return cal.compute_range(layer.spec)


def quantize_weights(model: nn.Module, config: PTQConfig, info: PTQInfo) -> None:
    """Quantize the weights of every layer not already quantized."""
    for layer in quant_layers(model).values():
        layer.set_weight_range(*weight_range(layer, config.weight_calibration))
