"""What happened during quantization, kept on the quantized model as ``qmodel.ptq_info``."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import PTQWarning


@dataclass
class PTQInfo:
    """A record of one :func:`ptqkit.quantize` run: the facts reports and advice are built on."""

    config: dict[str, Any] = field(default_factory=dict)
    traced: bool = False
    trace_error: str = ""
    folded_bn: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)  # quantized Conv/Linear
    skipped: list[str] = field(default_factory=list)  # left in float by `skip`
    quantizers: dict[str, str] = field(default_factory=dict)  # activation quantizer -> label
    disabled: dict[str, str] = field(default_factory=dict)  # quantizer -> why it stays float
    calibration_batches: int = 0
    calibration_samples: int = 0
    chosen: dict[str, str] = field(default_factory=dict)  # quantizer -> calibrator ("auto")
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    details: dict[str, Any] = field(default_factory=dict)  # per-stage results (CLE, fallback, ...)
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        """Record ``message`` and emit it as a :class:`PTQWarning`."""
        self.warnings.append(message)
        warnings.warn(message, PTQWarning, stacklevel=3)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
