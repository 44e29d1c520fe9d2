"""Export: a ptqkit quantized model → a QDQ ONNX file that ONNX Runtime runs on int8 kernels.

``export_onnx`` (TorchScript exporter + graph passes), the pass registry, and the runtime side:
``OrtModule`` (an ONNX Runtime session as a torch module), ``kernel_report`` (which layers ONNX
Runtime fused into integer kernels) and ``parity`` (simulation vs runtime)."""

from .onnx import FORMATS, check_exportable, encodings_path, export_onnx, strip_qdq
from .passes import PASSES, register_pass, run_passes
from .runtime import KernelReport, OrtModule, Parity, kernel_report, optimized_model, parity

__all__ = [
    "FORMATS",
    "PASSES",
    "KernelReport",
    "OrtModule",
    "Parity",
    "check_exportable",
    "encodings_path",
    "export_onnx",
    "kernel_report",
    "optimized_model",
    "parity",
    "register_pass",
    "run_passes",
    "strip_qdq",
]
