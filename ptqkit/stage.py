"""The context that carries values between the techniques of one :func:`ptqkit.quantize` run.

Values flow between techniques (:mod:`ptqkit.technique`) through the context's typed fields
(the copy being quantized, the reference batch of the capture check, the input layout it
passed in, the calibrators, what each tap took from the calibration pass), never through
attributes looked up by name, and never through the records of ``PTQInfo.details``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import PTQConfig
from .errors import ModelError
from .info import PTQInfo


@dataclass
class Context:
    """What the stages of one :func:`ptqkit.quantize` run share."""

    model: nn.Module  # the user's model: read, never modified
    data: Iterable[Any]  # the calibration batches
    config: PTQConfig
    info: PTQInfo
    ref: Any = None  # capture.verify.Reference: the model's output on the first batch, or None
    #: the capture check passed with channels-last inputs (capture.prepare.Capture): every
    #: calibration pass feeds the copy that way (same values, faster NHWC convolutions)
    channels_last: bool = False
    calibrators: dict[str, Any] = field(default_factory=dict)  # by quantizer, after calibration
    taps: dict[str, Any] = field(default_factory=dict)  # by stage: what it took from calibration
    _qmodel: nn.Module | None = None

    @property
    def qmodel(self) -> nn.Module:
        """The copy being quantized (set by the capture stage)."""
        if self._qmodel is None:
            raise ModelError("a stage ran before the model was captured")
        return self._qmodel

    @qmodel.setter
    def qmodel(self, value: nn.Module) -> None:
        self._qmodel = value


__all__ = ["Context"]
