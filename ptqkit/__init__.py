"""ptqkit: post-training quantization for PyTorch.

One verb and a config object::

    qmodel = ptqkit.quantize(model, calib_data, ptqkit.PTQConfig())
"""

from .calibrate import CALIBRATORS, register_calibrator
from .config import PTQConfig, QuantSpec
from .errors import (
    CalibrationError,
    ConfigError,
    DataError,
    ExportError,
    LoadError,
    ModelError,
    PTQError,
)

__version__ = "0.1.0"

__all__ = [
    "CALIBRATORS",
    "CalibrationError",
    "ConfigError",
    "DataError",
    "ExportError",
    "LoadError",
    "ModelError",
    "PTQConfig",
    "PTQError",
    "QuantSpec",
    "__version__",
    "register_calibrator",
]
