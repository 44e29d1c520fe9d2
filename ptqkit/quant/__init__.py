"""Quantization primitives and the modules that hold quantized weights and activations."""

from .primitives import MIN_SCALE, dequantize, fake_quant, qparams, quantize, sqnr_db, storage_dtype

__all__ = [
    "MIN_SCALE",
    "dequantize",
    "fake_quant",
    "qparams",
    "quantize",
    "sqnr_db",
    "storage_dtype",
]
