"""Errors raised by ptqkit. Every failure a user can cause ends in one of these, with a
message that names what was wrong (the layer, the batch, the field) instead of a traceback
from deep inside."""


class PTQError(Exception):
    """Base class of every error ptqkit raises on purpose."""


class ConfigError(PTQError, ValueError):
    """A QuantSpec / PTQConfig field is out of range or of the wrong type."""


class CalibrationError(PTQError, RuntimeError):
    """Calibration could not produce a range (no data, non-finite values, ...)."""


class DistributedError(CalibrationError):
    """Under ``torch.distributed``: another rank failed in a data-driven stage, or the ranks
    went out of step or ended with different models (every rank raises, none waits)."""


class DataError(PTQError, ValueError):
    """The calibration / evaluation data cannot be used (empty, wrong shape, wrong type)."""


class ModelError(PTQError, ValueError):
    """The model cannot be quantized (nothing quantizable, unsupported construct)."""


class ExportError(PTQError, RuntimeError):
    """The quantized model cannot be exported (unsupported op, bad path, bad example input)."""


class LoadError(PTQError, ValueError):
    """A saved quantized model is truncated, corrupt or not a ptqkit file."""


class SaveError(PTQError, OSError):
    """A quantized model cannot be written where asked (missing folder, path is a folder)."""


class PTQWarning(UserWarning):
    """Something the user should know: a fallback was taken, a best practice was not followed."""


def one_line(e: BaseException, limit: int = 500) -> str:
    """``e``'s message on one line (at most ``limit`` characters), or its type's name: how an
    error is shown where a traceback is too much (the command line, a summary)."""
    msg = " ".join(str(e).split())
    return msg[:limit] if msg else type(e).__name__


class NonFiniteDataError(CalibrationError, DataError):
    """The calibration data holds NaN or Inf values (at the model input or after a layer that
    overflows); the message names the quantizer, the batch and the sample."""
