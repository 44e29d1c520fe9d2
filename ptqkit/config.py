"""Configuration of :func:`ptqkit.quantize`: :class:`PTQConfig`, a frozen dataclass validated on
construction (one validator per field, :data:`_CHECKS`, then the checks that read several
fields), that round-trips through plain dicts (``to_dict`` / ``from_dict``) so that a TOML or
JSON file maps onto it field by field; unknown keys are an error. :class:`QuantSpec` and
:class:`Scope` live in :mod:`ptqkit.spec` and are re-exported here, as are the techniques'
options (:mod:`ptqkit.options`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import ConfigError
from .options import (
    AdaRoundOptions,
    BiasCorrectionOptions,
    GPTQOptions,
    _positive_number,
)
from .spec import (
    MAX_BITS,
    MIN_BITS,
    SCOPE_KEYS,
    QuantSpec,
    Scope,
    from_fields,
    technique_scope,
)


def _default_weights() -> QuantSpec:
    return QuantSpec(bits=8, symmetric=True, per_channel=True, axis=0)


def _default_activations() -> QuantSpec:
    return QuantSpec(bits=8, symmetric=False, per_channel=False)


#: PTQConfig fields that say how a run is shown, not what model it gives: left out of a recipe
#: (:meth:`PTQConfig.recipe`), so two configs that differ only there are the same recipe
RUNTIME_FIELDS = ("progress",)

@dataclass(frozen=True)
class PTQConfig:
    """Everything :func:`ptqkit.quantize` needs to know.

    Fields:
        weights: spec of the weights (default 8-bit symmetric per-channel).
        activations: spec of the activations (default 8-bit asymmetric per-tensor), or ``None``
            to quantize weights only.
        calibration: name of a registered activation calibrator (``ptqkit.CALIBRATORS``), or
            ``"auto"`` to choose per layer the one that minimizes that layer's output error.
            Default ``"mse"``: with ``bias_correction="auto"`` the best single recipe on
            average over the benchmark models (bench/ONEPASS.md, issue 14).
        weight_calibration: ``"minmax"`` or ``"mse"`` (per-channel range search on the weights).
        calibrator_options: keyword arguments for the activation calibrator's factory
            (e.g. ``{"percentile": 99.9}``).
        num_batches: calibration batches to use (``None`` = all of them).
        skip: fnmatch patterns of module names, or module class names, left in float.
        scopes: per-layer settings, in order, the last match winning: :class:`Scope` objects or
            ``(pattern, overrides)`` pairs, e.g. ``[("_blocks.1*", {"weights": W4}),
            ("fc", {"float": True}), ("classifier*", {"techniques": {"adaround": False}})]``
            (a technique off for some layers: :meth:`off_layers`).
        fold_bn: fold BatchNorm into the preceding conv/linear.
        cle: cross-layer equalization (Nagel et al. 2019) before calibration.
        bias_correction: ``False``, ``"empirical"`` (each output channel's mean, on the
            calibration data), ``"affine"`` (its mean and scale, least squares against the
            float outputs: :mod:`ptqkit.correct.affine`), ``"analytic"`` (data-free, from
            BatchNorm statistics), or ``"auto"``: affine where it costs one quantized pass (a
            traced model), otherwise none, and ``ptq_info`` says so; ``True`` means
            ``"empirical"``.
        adaround: adaptive rounding of the weights (Nagel et al. 2020).
        adaround_iters: optimization steps per layer for AdaRound.
        adaround_options: AdaRound's other hyperparameters (:class:`AdaRoundOptions`).
        bias_correction_options: empirical bias correction's (:class:`BiasCorrectionOptions`).
        gptq: GPTQ (Frantar et al. 2022, :mod:`ptqkit.correct.gptq`) picks the integer weights
            instead of nearest rounding: its :class:`GPTQOptions`, or ``None`` (off). One field
            holding the technique's options, ``None`` meaning off, so that there is no flag to
            keep in step with an options field (``True`` means ``GPTQOptions()``, ``False``
            ``None``; a dict is read as its fields). Not with ``adaround``.
        smoothquant: SmoothQuant migration strength alpha in [0, 1], or ``None``.
        max_degradation: accuracy target (points) for automatic float fallback, with labeled data.
        min_sqnr_db: output-SQNR target (dB) for automatic fallback without labels.
        progress: show progress bars.
        seed: seed for every random choice (AdaRound init, sampling).
        range_margin: headroom m >= 0 added to every calibrated activation range,
            ``m·(hi - lo)`` on each side (a side at 0 stays), after calibration; a remedy when
            the real inputs exceed the calibration data (see :mod:`ptqkit.analysis.range_coverage`).
        techniques: the registered techniques that have no field of their own, by name, each
            with its options object (``True``: its defaults; a dict: its fields), e.g.
            ``{"awq": AWQOptions(grid=20)}`` (:mod:`ptqkit.techniques`; checked against the
            registry when :func:`ptqkit.quantize` starts).
    """

    weights: QuantSpec = field(default_factory=_default_weights)
    activations: QuantSpec | None = field(default_factory=_default_activations)
    calibration: str = "mse"
    weight_calibration: str = "minmax"
    calibrator_options: dict[str, Any] = field(default_factory=dict)
    num_batches: int | None = None
    skip: tuple[str, ...] = ()
    scopes: tuple[Scope, ...] = ()
    fold_bn: bool = True
    cle: bool = False
    bias_correction: bool | str = "auto"
    adaround: bool = False
    adaround_iters: int = 500
    adaround_options: AdaRoundOptions = field(default_factory=AdaRoundOptions)
    bias_correction_options: BiasCorrectionOptions = field(default_factory=BiasCorrectionOptions)
    gptq: GPTQOptions | None = None
    smoothquant: float | None = None
    max_degradation: float | None = None
    min_sqnr_db: float | None = None
    progress: bool = True
    seed: int = 0
    range_margin: float = 0.0
    techniques: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # each field by its validator (:data:`_CHECKS`)
            check = _CHECKS.get(f.name)
            if check is not None:
                object.__setattr__(self, f.name, check(getattr(self, f.name)))
        _check_combinations(self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["weights"] = self.weights.to_dict()
        d["activations"] = None if self.activations is None else self.activations.to_dict()
        d["skip"] = list(self.skip)
        d["scopes"] = [sc.to_dict() for sc in self.scopes]
        return d

    def recipe(self) -> dict[str, Any]:
        """:meth:`to_dict` without the run-time settings (:data:`RUNTIME_FIELDS`): what decides
        the quantized model."""
        d = self.to_dict()
        for name in RUNTIME_FIELDS:
            del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PTQConfig:
        return from_fields(cls, d, "PTQConfig")

    def replace(self, **changes: Any) -> PTQConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def off_layers(self, technique: str, layers: Mapping[str, Wraps]) -> dict[str, str]:
        """The layers of ``layers`` (name → quantized layer, each wrapping its float module
        as ``.layer``: ``quant_layers(model)``) for which a scope turns the registered
        ``technique`` off, each with the label of the scope that decides it (the last one that
        matches the layer and names the technique, :func:`ptqkit.spec.technique_scope`).

        The one question every per-layer technique asks before its layer loop ("is ``T`` on
        for ``L``?": ``L not in config.off_layers(T, layers)``); it says nothing about whether
        the config enables ``T`` at all (``Technique.enabled``)."""
        off: dict[str, str] = {}
        if not any(technique in sc.techniques for sc in self.scopes):
            return off
        for name, wrapped in layers.items():
            sc = technique_scope(self.scopes, technique, name, wrapped.layer)
            if sc is not None and not sc.techniques[technique]:
                off[name] = sc.label
        return off


class Wraps(Protocol):
    """A quantized layer as :meth:`PTQConfig.off_layers` reads it: the float Conv/Linear it
    wraps (what a scope's pattern is matched against, by name and class)."""

    @property
    def layer(self) -> Any: ...


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(value: Any, least: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= least


def _spec(name: str, optional: bool) -> Callable[[Any], Any]:
    """A :class:`QuantSpec` field (a dict is read as its fields; ``None`` when ``optional``)."""

    def check(value: Any) -> Any:
        if isinstance(value, dict):
            value = QuantSpec.from_dict(value)
        if not isinstance(value, QuantSpec) and not (optional and value is None):
            kind = "a QuantSpec or None" if optional else "a QuantSpec"
            raise ConfigError(f"PTQConfig.{name} must be {kind}, got {value!r}")
        return value

    return check


def _options(name: str, kind: type, optional: bool = False) -> Callable[[Any], Any]:
    """A technique's options field: the dataclass, a dict of its fields, or (``optional``)
    ``None``/``False`` (off) and ``True`` (its defaults)."""

    def check(value: Any) -> Any:
        if optional and (value is None or value is False or value is True):
            return kind() if value is True else None
        if isinstance(value, dict):
            return from_fields(kind, value, kind.__name__)
        if not isinstance(value, kind):
            none = " None or" if optional else ""
            raise ConfigError(f"PTQConfig.{name} must be{none} a {kind.__name__}, got {value!r}")
        return value

    return check


def _test(ok: Callable[[Any], bool], message: str) -> Callable[[Any], Any]:
    """A field kept as it is when ``ok(value)``, else a :class:`ConfigError` (``message`` is
    formatted with ``value``)."""

    def check(value: Any) -> Any:
        if not ok(value):
            raise ConfigError(message.format(value=value))
        return value

    return check


def _bool(name: str) -> Callable[[Any], Any]:
    return _test(lambda v: isinstance(v, bool), f"PTQConfig.{name} must be a bool, got {{value!r}}")


def _skip(value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, list)):
        value = (value,) if isinstance(value, str) else tuple(value)
    if not isinstance(value, tuple) or not all(isinstance(s, str) for s in value):
        raise ConfigError(f"skip must be a tuple of strings, got {value!r}")
    return value


def _scopes(value: Any) -> tuple[Scope, ...]:
    if not isinstance(value, (tuple, list)):
        raise ConfigError(f"scopes must be a list of scopes, got {value!r}")
    return tuple(Scope.of(v) for v in value)


def _bias_correction(value: Any) -> Any:
    value = "empirical" if value is True else value
    if value not in (False, "empirical", "affine", "analytic", "auto"):
        raise ConfigError(
            "bias_correction must be False, True, 'empirical', 'affine', 'analytic' or 'auto', "
            f"got {value!r}"
        )
    return value


def _range_margin(value: Any) -> Any:
    _positive_number(value, "PTQConfig.range_margin", zero=True)
    return value


#: one validator per checked field: returns the field's value (normalized: a dict read as its
#: dataclass, ``True`` as its meaning) or raises :class:`ConfigError` naming the field
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "weights": _spec("weights", optional=False),
    "activations": _spec("activations", optional=True),
    # the calibrator's name is checked against the registry where it is used (ptqkit.quantize)
    "calibration": _test(
        lambda v: isinstance(v, str) and bool(v),
        "PTQConfig.calibration must name a calibrator, got {value!r}",
    ),
    "weight_calibration": _test(
        lambda v: v in ("minmax", "mse"),
        "weight_calibration must be 'minmax' or 'mse', got {value!r}",
    ),
    "calibrator_options": _test(
        lambda v: isinstance(v, dict), "PTQConfig.calibrator_options must be a dict"
    ),
    "num_batches": _test(
        lambda v: v is None or _int(v, 1), "num_batches must be None or an int >= 1, got {value!r}"
    ),
    "skip": _skip,
    "scopes": _scopes,
    "fold_bn": _bool("fold_bn"),
    "cle": _bool("cle"),
    "bias_correction": _bias_correction,
    "adaround": _bool("adaround"),
    "adaround_iters": _test(
        lambda v: _int(v, 1), "adaround_iters must be an int >= 1, got {value!r}"
    ),
    "adaround_options": _options("adaround_options", AdaRoundOptions),
    "bias_correction_options": _options("bias_correction_options", BiasCorrectionOptions),
    "gptq": _options("gptq", GPTQOptions, optional=True),
    "smoothquant": _test(
        lambda v: v is None or (_number(v) and 0.0 <= v <= 1.0),
        "smoothquant must be None or in [0, 1], got {value!r}",
    ),
    "max_degradation": _test(
        lambda v: v is None or (_number(v) and v >= 0),
        "max_degradation must be >= 0, got {value!r}",
    ),
    # NaN compares false with everything: the fallback would silently ignore the target
    "min_sqnr_db": _test(
        lambda v: v is None or (_number(v) and math.isfinite(v)),
        "min_sqnr_db must be a finite number, got {value!r}",
    ),
    "progress": _bool("progress"),
    "seed": _test(
        lambda v: isinstance(v, int) and not isinstance(v, bool),
        "seed must be an int, got {value!r}",
    ),
    "range_margin": _range_margin,
    "techniques": _test(
        lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
        "PTQConfig.techniques must be a dict {{technique name: its options}}, got {value!r}",
    ),
}


def _check_combinations(config: PTQConfig) -> None:
    """What no single field's validator sees: gptq with adaround, dynamic weights, group-wise
    activations (``group_size`` is a weight setting only)."""
    if config.gptq is not None and config.adaround is True:
        raise ConfigError(
            "gptq and adaround both choose the integer weights: set one of them "
            "(gptq=None or adaround=False)"
        )
    if config.weights.dynamic:
        raise ConfigError("weights cannot be dynamic=True (that is for activations)")
    if config.activations is not None and config.activations.group_size is not None:
        raise ConfigError(
            "PTQConfig.activations: group_size is for weights only (group-wise scales "
            "along a layer's input dimension); set activations.group_size=None"
        )


__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "RUNTIME_FIELDS",
    "SCOPE_KEYS",
    "AdaRoundOptions",
    "BiasCorrectionOptions",
    "GPTQOptions",
    "PTQConfig",
    "QuantSpec",
    "Scope",
    "Wraps",
]
