"""The chapter's best practices (9.2, "Bonnes Pratiques") as advice triggered by measurements.

Each practice is a rule in :data:`RULES`: a function of the measured :class:`Facts` that returns
a message when the measurement shows the practice was not followed (or did not suffice), and
``None`` otherwise. :func:`advise` runs every rule; nothing is printed here (the CLI and the HTML
report show the result).

Adding a rule is adding an entry::

    @rule("my_rule", "the practice, in one line")
    def _my_rule(f: Facts) -> str | None:
        return "what to do" if f.some_measure > limit else None
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .analysis.metrics import MAX_DEGRADATION, degradation_message, judged_loss
from .info import MIN_CALIBRATION_SAMPLES, sample_shortfall

#: degradation above which quantization-aware training is worth its cost
QAT_DEGRADATION = 3.0
#: fraction of a tensor's calibration values outside its range that counts as "a large fraction"
MAX_CLIPPED = 0.01


@dataclass
class Facts:
    """What was measured on one quantized model (every field optional: a rule whose facts are
    missing stays silent)."""

    config: dict[str, Any] = field(default_factory=dict)
    calibration_samples: int | None = None
    #: samples ``ptqkit.tune`` held out of the model's calibration (to score the recipes)
    held_out_samples: int = 0
    metric: str | None = None
    fp32: float | None = None
    quantized: float | None = None
    degradation: float | None = None
    #: expected top-1 cost (points) under the float model's probabilities (EvalResult)
    expected_cost: float = math.nan
    #: evaluation ran on the calibration data itself (no held-out set was given)
    evaluated_on_calibration_data: bool = False
    #: depthwise convs whose weights are quantized per tensor
    depthwise_per_tensor: list[str] = field(default_factory=list)
    #: activation quantizers left in float, with the reason
    float_activations: dict[str, str] = field(default_factory=dict)
    #: layers left in float (``skip`` or fallback)
    float_layers: list[str] = field(default_factory=list)
    #: activation quantizer label -> fraction of its calibration values the chosen range clips
    clipped: dict[str, float] = field(default_factory=dict)
    #: activation quantizer label -> fraction of held-out (evaluation) values outside its range
    heldout_clipped: dict[str, float] = field(default_factory=dict)
    #: a comparison of methods ran: ``(best method, its metric)``
    best_method: tuple[str, float] | None = None
    #: activation quantizer label -> outlier found in its calibration data (``ptq_info.outliers``)
    outliers: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: activation quantizer -> its coverage of the evaluation data (``EvalResult.coverage``)
    coverage: dict[str, Any] = field(default_factory=dict)
    #: the config changes ``ptqkit.tune`` tried and scored (``{field: [values]}``), if it ran
    tuned: dict[str, list[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Advice:
    """One triggered rule: ``rule`` (its registry name), ``level`` (``"warning"`` when the
    measurement shows a problem, ``"tip"`` for a suggestion), ``message`` (what to do, from the
    measurement) and ``practice`` (the chapter's practice it comes from)."""

    rule: str
    level: str
    message: str
    practice: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


@dataclass(frozen=True)
class Rule:
    name: str
    practice: str
    level: str
    check: Callable[[Facts], str | None]


#: every rule, by name, in the order they are reported
RULES: dict[str, Rule] = {}


def rule(
    name: str, practice: str, level: str = "warning"
) -> Callable[[Callable[[Facts], str | None]], Callable[[Facts], str | None]]:
    """Register ``check`` as the rule ``name`` (decorator)."""
    if level not in ("warning", "tip"):
        raise ValueError(f"level must be 'warning' or 'tip', got {level!r}")

    def add(check: Callable[[Facts], str | None]) -> Callable[[Facts], str | None]:
        RULES[name] = Rule(name, practice, level, check)
        return check

    return add


def advise(facts: Facts, rules: dict[str, Rule] | None = None) -> list[Advice]:
    """Run every rule on ``facts``; the triggered ones, warnings first, in registry order."""
    out = []
    for r in (RULES if rules is None else rules).values():
        msg = r.check(facts)
        if msg:
            out.append(Advice(r.name, r.level, msg, r.practice))
    return sorted(out, key=lambda a: a.level != "warning")


# -- facts ---------------------------------------------------------------------------------------
def _is_depthwise(layer: nn.Module) -> bool:
    groups = getattr(layer, "groups", 1)
    return groups > 1 and groups == getattr(layer, "in_channels", -1)


def gather(
    qmodel: nn.Module,
    result: Any = None,
    *,
    clipped: dict[str, float] | None = None,
    heldout_clipped: dict[str, float] | None = None,
    comparison: Any = None,
    evaluated_on_calibration_data: bool = False,
) -> Facts:
    """:class:`Facts` of ``qmodel`` (returned by :func:`ptqkit.quantize`) from its ``ptq_info``,
    an :class:`~ptqkit.EvalResult` ``result``, the clipped fractions measured on the calibration
    histograms (``{quantizer label: fraction}``) and a :class:`~ptqkit.compare.Comparison`."""
    from .quant.modules import quant_layers

    info = getattr(qmodel, "ptq_info", None)
    f = Facts(evaluated_on_calibration_data=evaluated_on_calibration_data)
    if info is not None:
        f.config = dict(info.config)
        f.calibration_samples = info.calibration_samples
        f.held_out_samples = info.held_out_samples
        f.float_activations = {info.quantizers.get(k, k): v for k, v in info.disabled.items()}
        f.float_layers = list(info.skipped)
        f.outliers = dict(getattr(info, "outliers", None) or {})
        for t in info.details.get("recipe", {}).get("trials", []):
            if t.get("status") == "ran":
                for k, v in dict(t.get("changes") or {}).items():
                    f.tuned.setdefault(k, []).append(v)
    for name, layer in quant_layers(qmodel).items():
        if _is_depthwise(layer.layer) and not layer.spec.per_channel:
            f.depthwise_per_tensor.append(name)
        if not layer.quantized and name not in f.float_layers:
            f.float_layers.append(name)
    if result is not None:
        f.metric, f.fp32, f.quantized = result.metric, result.fp32, result.quantized
        f.degradation = result.degradation
        f.expected_cost = getattr(result, "expected_cost", math.nan)
        f.coverage = dict(getattr(result, "coverage", None) or {})
    f.clipped = dict(clipped or {})
    f.heldout_clipped = dict(heldout_clipped or {})
    if comparison is not None and getattr(comparison, "rows", None):
        best = comparison.best()
        if best is not None:
            f.best_method = (best.method, best.quantized)
    return f


# -- the rules (the chapter's list, in its order) --------------------------------------------------
@rule("calibration_samples", "Use at least 100-1000 calibration samples")
def _samples(f: Facts) -> str | None:
    n = f.calibration_samples
    if n is None or f.config.get("activations") is None:
        return None
    return sample_shortfall(n, f.held_out_samples)


@rule(
    "representative_data",
    "Calibrate on data that represents the real input distribution",
)
def _representative(f: Facts) -> str | None:
    if f.coverage:  # measured on every evaluation value: see the calibration_coverage rule
        return None
    worse = sorted(
        (
            (v, k)
            for k, v in f.heldout_clipped.items()
            if v > MAX_CLIPPED and v > 5 * f.clipped.get(k, 0.0)
        ),
        reverse=True,
    )
    if not worse:
        return None
    shown = "; ".join(
        f"{k}: {100 * v:.1f}% vs {100 * f.clipped.get(k, 0.0):.2f}%" for v, k in worse[:3]
    )
    return (
        f"{len(worse)} tensor(s) see far more values outside their calibrated range on the "
        f"evaluation data than on the calibration data ({shown}): the calibration data does "
        "not represent the inputs well; calibrate on samples drawn like the real inputs"
    )


@rule(
    "calibration_coverage",
    "The calibrated ranges must hold the real inputs (ptqkit.analysis.range_coverage)",
)
def _coverage(f: Facts) -> str | None:
    from .analysis.range_coverage import coverage_message

    return coverage_message(f.coverage)


@rule("calibration_outliers", "Calibrate on clean, representative data")
def _outliers(f: Facts) -> str | None:
    if not f.outliers:
        return None
    from .calibrate.outliers import describe

    worst = sorted(f.outliers.items(), key=lambda kv: -kv[1]["ratio"])[:3]
    more = f" (and {len(f.outliers) - 3} more)" if len(f.outliers) > 3 else ""
    return (
        "; ".join(describe(label, o) for label, o in worst)
        + more
        + ": check the data (a corrupt sample, a glitch?). The histogram calibrators "
        "(percentile, mse, kl) leave such values out of their ranges; minmax and ema do not."
    )


@rule("try_calibrators", "Try several calibration methods (min-max, KL, percentile)", "tip")
def _calibrators(f: Facts) -> str | None:
    loss = judged_loss(f.degradation, f.metric, f.expected_cost)
    if loss is None or loss <= MAX_DEGRADATION:
        return None
    if f.best_method is not None:
        name, value = f.best_method
        if f.quantized is not None and value > f.quantized + 0.1:
            return (
                f"the comparison found '{name}' better: {value:.2f} vs {f.quantized:.2f} "
                f"({f.metric}); quantize with it"
            )
        return None
    cal = f.config.get("calibration", "?")
    if f.tuned.get("calibration"):  # ptqkit.tune scored others already
        return None
    return (
        f"only the '{cal}' calibrator was tried; compare them all on this model: "
        "`ptqkit compare --model ... --data ...` (the chapter's exercise 9.2.2)"
    )


@rule("quantize_activations", "Quantize weights AND activations (not only the weights)")
def _activations(f: Facts) -> str | None:
    if f.config and f.config.get("activations") is None:
        return (
            "activations are not quantized (activations=None): the model still computes in "
            "float, so it is smaller but not faster; quantize activations too and run it on "
            "integer kernels (ONNX export)"
        )
    if f.float_activations:
        names = ", ".join(sorted(f.float_activations)[:3])
        more = len(f.float_activations) - 3
        why = next(iter(f.float_activations.values()))
        return (
            f"{len(f.float_activations)} activation quantizer(s) stay in float ({why}): "
            f"{names}{f' and {more} more' if more > 0 else ''}; the runtime will convert "
            "between int8 and float around them"
        )
    return None


@rule("per_channel_depthwise", "Use per-channel quantization for convolution weights")
def _depthwise(f: Facts) -> str | None:
    if not f.depthwise_per_tensor:
        return None
    names = ", ".join(f.depthwise_per_tensor[:3])
    more = len(f.depthwise_per_tensor) - 3
    return (
        f"{len(f.depthwise_per_tensor)} depthwise conv(s) have per-tensor weights ({names}"
        f"{f' and {more} more' if more > 0 else ''}): their channels' ranges differ by orders "
        "of magnitude and one 8-bit scale collapses the small ones; use per-channel weights "
        "(weights.per_channel = true) or cross-layer equalization (cle = true)"
    )


@rule(
    "calibrator_clipping",
    "Choose a calibrator whose range fits the data (min-max, KL, percentile)",
)
def _clipping(f: Facts) -> str | None:
    bad = sorted(((v, k) for k, v in f.clipped.items() if v > MAX_CLIPPED), reverse=True)
    if not bad:
        return None
    cal = f.config.get("calibration", "?")
    worst = "; ".join(f"{k}: {100 * v:.1f}%" for v, k in bad[:3])
    return (
        f"the '{cal}' ranges clip more than {100 * MAX_CLIPPED:g}% of the calibration values "
        f"of {len(bad)} tensor(s) ({worst}); if accuracy suffers, try 'mse' or 'percentile' "
        "(see the histograms in the report)"
    )


@rule("degradation", "Check the result on a validation set; consider QAT if it loses > 2-3%")
def _degradation(f: Facts) -> str | None:
    loss = judged_loss(f.degradation, f.metric, f.expected_cost)
    if f.degradation is None or loss is None or loss <= MAX_DEGRADATION:
        return None
    c = f.config
    tips = []
    weights = c.get("weights") or {}
    if weights and not weights.get("per_channel", True):
        tips.append("per-channel weights (weights.per_channel = true)")
    tried = f.tuned  # what ptqkit.tune measured already is not suggested again
    if c and not c.get("cle") and "cle" not in tried:
        tips.append("cross-layer equalization (cle = true)")
    if "calibration" not in tried:
        tips.append(f"another calibrator than '{c.get('calibration', '?')}' (or 'auto')")
    if c and not c.get("bias_correction") and "bias_correction" not in tried:
        tips.append("bias correction (bias_correction = true)")
    if tried:
        tips.append(f"a longer ptqkit.tune budget (it tried: {', '.join(sorted(tried))})")
    if c and c.get("max_degradation") is None and c.get("min_sqnr_db") is None:
        tips.append("float fallback of the most sensitive layers (max_degradation = ...)")
    if loss > QAT_DEGRADATION:
        tips.append("quantization-aware training if PTQ cannot close the gap")
    return (
        f"{degradation_message(f.degradation, f.metric, f.expected_cost)} (more than "
        f"{MAX_DEGRADATION:g}); try: " + "; ".join(tips)
    )


@rule("validation_set", "Check the performance on a validation set", "tip")
def _validation(f: Facts) -> str | None:
    if f.degradation is None:
        return (
            "the quantized model was not evaluated; measure it on held-out data "
            "(ptqkit.evaluate, or --eval-data)"
        )
    if f.evaluated_on_calibration_data:
        return (
            "the metric was measured on the calibration data itself, which flatters the "
            "quantized model; give held-out data (--eval-data)"
        )
    return None


__all__ = [
    "MAX_CLIPPED",
    "MAX_DEGRADATION",
    "MIN_CALIBRATION_SAMPLES",
    "RULES",
    "Advice",
    "Facts",
    "Rule",
    "advise",
    "gather",
    "rule",
]
