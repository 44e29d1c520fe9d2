"""Export: a ptqkit quantized model → a QDQ ONNX file that ONNX Runtime runs on int8 kernels.

``export_onnx`` (TorchScript exporter + graph passes), the pass registry, and the runtime side:
``OrtModule`` (an ONNX Runtime session as a torch module), ``kernel_report`` (which layers ONNX
Runtime fused into integer kernels) and ``parity`` (simulation vs runtime). ``export_pt2``: the
same model as a ``torch.export`` program with pt2e Q/DQ ops, ``compile_int8`` its Inductor int8
build (:mod:`ptqkit.export.pt2`); ``export_pte`` its ExecuTorch/XNNPACK ``.pte``
(:mod:`ptqkit.export.executorch`, optional ``executorch``)."""

from .executorch import PteModule, export_pte, load_pte
from .onnx import FORMATS, check_exportable, encodings_path, export_onnx, strip_qdq
from .passes import PASSES, register_pass, run_passes
from .pt2 import compile_int8, export_pt2, load_pt2, program_report
from .runtime import KernelReport, OrtModule, Parity, kernel_report, optimized_model, parity

__all__ = [
    "FORMATS",
    "PASSES",
    "KernelReport",
    "OrtModule",
    "Parity",
    "PteModule",
    "check_exportable",
    "compile_int8",
    "encodings_path",
    "export_onnx",
    "export_pt2",
    "export_pte",
    "kernel_report",
    "load_pt2",
    "load_pte",
    "optimized_model",
    "parity",
    "program_report",
    "register_pass",
    "run_passes",
    "strip_qdq",
]
