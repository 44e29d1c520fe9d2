"""ptqkit: post-training quantization for PyTorch.

One verb and a config object::

    qmodel = ptqkit.quantize(model, calib_data, ptqkit.PTQConfig())
    res = ptqkit.evaluate(model, qmodel, test_data)
    ptqkit.export_onnx(qmodel, "model.int8.onnx", example_input)
"""

from __future__ import annotations

import importlib
from typing import Any

from .calibrate import CALIBRATORS, register_calibrator
from .config import (
    AdaRoundOptions,
    BiasCorrectionOptions,
    GPTQOptions,
    PTQConfig,
    QuantSpec,
    Scope,
)
from .errors import (
    CalibrationError,
    ConfigError,
    DataError,
    ExportError,
    LoadError,
    ModelError,
    PTQError,
    PTQWarning,
    SaveError,
)
from .info import PTQInfo
from .pipeline import quantize

__version__ = "0.1.0"

# public names whose modules are imported on first use (keeps `import ptqkit` light)
_LAZY = {
    "evaluate": "ptqkit.analysis.metrics",
    "EvalResult": "ptqkit.analysis.metrics",
    "sensitivity": "ptqkit.analysis.sensitivity",
    "SensitivityReport": "ptqkit.analysis.sensitivity",
    "Report": "ptqkit.report.html",
    "Advice": "ptqkit.advice",
    "Comparison": "ptqkit.compare",
    "save": "ptqkit.io",
    "load": "ptqkit.io",
    "export_onnx": "ptqkit.export.onnx",
    "export_pt2": "ptqkit.export.pt2",
    "write_report": "ptqkit.report.html",
    "run_job": "ptqkit.job",
    "JobResult": "ptqkit.job",
    "JobOptions": "ptqkit.job",
    "tune": "ptqkit.recipe",
    "mixed_precision": "ptqkit.analysis.mixed",
    "MixedPrecisionPlan": "ptqkit.analysis.allocation",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ptqkit' has no attribute {name!r}")


__all__ = [
    "CALIBRATORS",
    "AdaRoundOptions",
    "Advice",
    "BiasCorrectionOptions",
    "CalibrationError",
    "Comparison",
    "ConfigError",
    "DataError",
    "EvalResult",
    "ExportError",
    "GPTQOptions",
    "JobOptions",
    "JobResult",
    "LoadError",
    "MixedPrecisionPlan",
    "ModelError",
    "PTQConfig",
    "PTQError",
    "PTQInfo",
    "PTQWarning",
    "QuantSpec",
    "Report",
    "SaveError",
    "Scope",
    "SensitivityReport",
    "__version__",
    "evaluate",
    "export_onnx",
    "export_pt2",
    "load",
    "mixed_precision",
    "quantize",
    "register_calibrator",
    "run_job",
    "save",
    "sensitivity",
    "tune",
    "write_report",
]
