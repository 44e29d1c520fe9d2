"""``torch.export`` of a ptqkit quantized model with the standard pt2e Q/DQ ops
(:func:`export_pt2`, :func:`load_pt2`, :func:`program_report`) and its int8 execution by
``torch.compile``/Inductor on x86 (:func:`compile_int8`)."""

from .inductor import Int8Compiled, KernelCount, compile_int8, count_kernels
from .program import (
    LayerQDQ,
    ProgramReport,
    check_pt2_exportable,
    export_pt2,
    load_pt2,
    program_report,
)

__all__ = [
    "Int8Compiled",
    "KernelCount",
    "LayerQDQ",
    "ProgramReport",
    "check_pt2_exportable",
    "compile_int8",
    "count_kernels",
    "export_pt2",
    "load_pt2",
    "program_report",
]
