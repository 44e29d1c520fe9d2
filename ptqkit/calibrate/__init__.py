"""Streaming, mergeable calibrators: statistics (:mod:`.stats`) apart from range solvers
(:mod:`.solvers`), registered by name (:data:`CALIBRATORS`)."""

from .calibrators import (
    CALIBRATORS,
    AutoPercentileCalibrator,
    Calibrator,
    EMACalibrator,
    KLCalibrator,
    MinMaxCalibrator,
    MSECalibrator,
    PercentileCalibrator,
    check_calibration,
    make_calibrator,
    register_calibrator,
)
from .stats import HistogramStats, MinMaxStats

__all__ = [
    "CALIBRATORS",
    "AutoPercentileCalibrator",
    "Calibrator",
    "EMACalibrator",
    "HistogramStats",
    "KLCalibrator",
    "MSECalibrator",
    "MinMaxCalibrator",
    "MinMaxStats",
    "PercentileCalibrator",
    "check_calibration",
    "make_calibrator",
    "register_calibrator",
]
