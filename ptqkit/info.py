"""What happened during quantization, kept on the quantized model as ``qmodel.ptq_info``."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ModelError, PTQWarning
from .records import Details

#: the chapter: "Utiliser au moins 100-1000 échantillons de calibration"
MIN_CALIBRATION_SAMPLES = 100


def sample_shortfall(samples: int, held_out: int = 0) -> str | None:
    """What to tell a user whose model was calibrated on fewer than
    :data:`MIN_CALIBRATION_SAMPLES` samples (``None`` when it was not). ``held_out``: samples the
    user did give but that :func:`ptqkit.tune` held out of the returned model's calibration (to
    score the recipes); when they would have met the minimum, the remedy is the budget, not
    more data."""
    if samples >= MIN_CALIBRATION_SAMPLES:
        return None
    given = samples + held_out
    if held_out and given >= MIN_CALIBRATION_SAMPLES:
        return (
            f"calibrated on only {samples} samples: ptqkit.tune held {held_out} of the {given} "
            "given out to score the recipes, and quantizing the chosen recipe again on all of "
            "them did not fit in its budget; raise budget_s"
        )
    return (
        f"calibrated on only {samples} samples: activation ranges from so few samples are "
        f"noisy; use at least {MIN_CALIBRATION_SAMPLES}-1000 representative samples"
    )


@dataclass
class PTQInfo:
    """A record of one :func:`ptqkit.quantize` run: the facts reports and advice are built on."""

    config: dict[str, Any] = field(default_factory=dict)
    traced: bool = False
    trace_error: str = ""
    # capture used ("fx" | "export" | "hooks"), each method tried ("fx: <why not>", ...), the
    # relative error of the float copy against the model (ptqkit.capture.verify), per check
    # ("capture", "CLE" with its bias absorption, "SmoothQuant")
    capture: str = ""
    capture_attempts: list[str] = field(default_factory=list)
    capture_error: float = 0.0
    capture_checks: dict[str, float] = field(default_factory=dict)
    # shapes and dtypes of the example batch's tensors ({"args": [[shape, dtype]], "kwargs":
    # {name: [shape, dtype]}}): what `load` re-runs torch.export on (no data is kept)
    capture_inputs: dict[str, Any] = field(default_factory=dict)
    folded_bn: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)  # quantized Conv/Linear
    skipped: list[str] = field(default_factory=list)  # modules with weights left in float
    skip_reasons: dict[str, str] = field(default_factory=dict)  # skipped module -> why
    # with PTQConfig.scopes: layer -> {"weights": spec dict | "float": True, "scopes": [...]}
    layer_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    quantizers: dict[str, str] = field(default_factory=dict)  # activation quantizer -> label
    disabled: dict[str, str] = field(default_factory=dict)  # quantizer -> why it stays float
    calibration_batches: int = 0
    calibration_samples: int = 0
    chosen: dict[str, str] = field(default_factory=dict)  # quantizer -> calibrator ("auto")
    # activation quantizer label -> {quantizer, max, percentile, q, ratio, batch}: calibration
    # data whose max |x| lies > 100x beyond its 99.9th percentile q (ptqkit.calibrate.outliers)
    outliers: dict[str, dict[str, Any]] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    # per-technique records (CLE, fallback, tune, ...): every key and its type in
    # ptqkit.records.Details; a record for the user, never a stage's input
    details: Details = field(default_factory=Details)
    # ptqkit.tune: which recipe was chosen and how, in one line (the trials: details["recipe"])
    recipe: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def held_out_samples(self) -> int:
        """Samples :func:`ptqkit.tune` held out of this model's calibration (0 when it refit the
        chosen recipe on all the data, or did not run)."""
        rec = self.details.get("recipe", {})
        return 0 if rec.get("refit", True) else int(rec.get("held_out_samples", 0))

    def sample_shortfall(self) -> str | None:
        """:func:`sample_shortfall` for this model (``None`` when no activation is quantized)."""
        if self.config.get("activations") is None:
            return None
        return sample_shortfall(self.calibration_samples, self.held_out_samples)

    def warn(self, message: str) -> None:
        """Record ``message`` and emit it as a :class:`PTQWarning`."""
        self.warnings.append(message)
        warnings.warn(message, PTQWarning, stacklevel=3)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def info_of(qmodel: object) -> PTQInfo:
    """``qmodel.ptq_info``, typed; :class:`ModelError` when ``qmodel`` has none (it is not a
    model :func:`ptqkit.quantize` returned)."""
    info = getattr(qmodel, "ptq_info", None)
    if not isinstance(info, PTQInfo):
        raise ModelError(
            f"{type(qmodel).__name__} has no ptq_info: not a model ptqkit.quantize returned"
        )
    return info
