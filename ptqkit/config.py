"""Configuration objects: :class:`QuantSpec` (how one tensor is quantized) and :class:`PTQConfig`
(what :func:`ptqkit.quantize` does). Both are frozen dataclasses, validated on construction, and
round-trip through plain dicts (``to_dict`` / ``from_dict``) so that a TOML or JSON file maps onto
them field by field; unknown keys are an error."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .options import (
    AdaRoundOptions,
    BiasCorrectionOptions,
    GPTQOptions,
    _positive_number,
)

MIN_BITS, MAX_BITS = 2, 16


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Integer grids (``b = bits``):

    * symmetric: signed, full range ``[-2^(b-1), 2^(b-1)-1]``, zero point 0 (the same grid as
      ONNX ``QuantizeLinear`` with int8 output); the scale uses ``2^(b-1)-1`` so that ``-max`` and
      ``+max`` are both representable: ``s = max(|lo|, |hi|) / (2^(b-1) - 1)``.
    * asymmetric: unsigned ``[0, 2^b - 1]``, ``s = (hi - lo) / (2^b - 1)``,
      ``z = clamp(round(-lo / s), 0, 2^b - 1)`` so that real 0.0 is exactly representable.

    ``per_channel`` quantizes each slice along ``axis`` with its own scale (weights: axis 0, the
    output channels, for Conv and Linear alike).

    ``dynamic`` (activations only): scale and zero point from the tensor at run time, not
    calibrated: per row of ``x.reshape(-1, x.shape[-1])`` (``per_channel=True``: one per token)
    or per tensor, by the formulas above (:mod:`ptqkit.quant.dynamic`).

    ``group_size`` (weights only; needs ``per_channel``): each output channel's weights, flattened
    to ``K`` input elements (a Linear's ``in_features``; a Conv's ``in_channels/groups·kh·kw`` in
    ``weight.reshape(out, -1)`` order), are cut into groups of ``group_size`` consecutive elements,
    each with its own scale (and zero point): ``scale`` has shape ``[out, ceil(K / group_size)]``.
    A ``group_size`` that does not divide ``K`` leaves a **last, shorter group** (the layout ONNX
    ``DequantizeLinear`` with ``block_size`` and ``MatMulNBits`` pad to), so every layer of a
    model takes the same spec; ``K <= group_size`` is one group, i.e. per-channel. ``None``:
    per-channel (or per-tensor) as without groups. Transposed convs refuse it (ConfigError).
    """

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False
    axis: int = 0
    group_size: int | None = None
    dynamic: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigError(f"QuantSpec.bits must be an int, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"QuantSpec.bits must be in {MIN_BITS}..{MAX_BITS}, got {self.bits}")
        for name in ("symmetric", "per_channel", "dynamic"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"QuantSpec.{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise ConfigError(f"QuantSpec.axis must be an int, got {self.axis!r}")
        if self.dynamic and (self.group_size is not None or (self.per_channel and self.axis)):
            raise ConfigError(
                f"QuantSpec(dynamic=True): per row (per_channel=True, axis=0) or per tensor, "
                f"without group_size; got axis={self.axis}, group_size={self.group_size}"
            )
        g = self.group_size
        if g is not None:
            if isinstance(g, bool) or not isinstance(g, int) or g < 2:
                raise ConfigError(f"QuantSpec.group_size must be None or an int >= 2, got {g!r}")
            if not self.per_channel:
                raise ConfigError(
                    f"QuantSpec.group_size={g} gives each output channel's groups their own "
                    "scales: it needs per_channel=True"
                )

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["group_size"] is None:  # the dict (and a saved file's) of a spec without groups
            del d["group_size"]  # stays as it was before group_size existed
        if not d["dynamic"]:  # (the same for a static spec)
            del d["dynamic"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        return _from_dict(cls, d, "QuantSpec")


def _default_weights() -> QuantSpec:
    return QuantSpec(bits=8, symmetric=True, per_channel=True, axis=0)


def _default_activations() -> QuantSpec:
    return QuantSpec(bits=8, symmetric=False, per_channel=False)


#: PTQConfig fields that say how a run is shown, not what model it gives: left out of a recipe
#: (:meth:`PTQConfig.recipe`), so two configs that differ only there are the same recipe
RUNTIME_FIELDS = ("progress",)

#: what a scope can override (see :class:`Scope`)
SCOPE_KEYS = ("weights", "activations", "float")


@dataclass(frozen=True)
class Scope:
    """Per-layer settings: the Conv/Linear layers that ``pattern`` matches get these overrides.

    ``pattern`` matches a layer by its module name (``fnmatch`` glob, e.g. ``"_blocks.1*"``;
    ``"re:..."`` for a regular expression, matched in full) or by its class name (``"Linear"``;
    from Python also a module type, ``nn.Linear``, which matches subclasses). Overrides:

    * ``weights``: the layer's weight spec (e.g. ``QuantSpec(bits=4, per_channel=True)``);
    * ``activations``: a dynamic spec for the (Linear) layer's input; its output is left to
      its consumers (static activation specs are model-wide);
    * ``float``: ``True`` leaves the layer in float (as ``skip`` does).

    In :attr:`PTQConfig.scopes` the scopes apply in order, the last match winning per override;
    a pattern that matches no quantizable layer of the model is a :class:`ConfigError` (raised
    by :func:`ptqkit.quantize`, which knows the model). Every layer's effective settings are in
    ``ptq_info.layer_settings``.
    """

    pattern: Any  # str, or an nn.Module subclass
    weights: QuantSpec | None = None
    activations: QuantSpec | None = None
    float: bool = False

    def __post_init__(self) -> None:
        p = self.pattern
        if not (isinstance(p, str) and p) and not isinstance(p, type):
            raise ConfigError(f"Scope.pattern must be a non-empty string or a type, got {p!r}")
        if isinstance(p, str) and p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ConfigError(f"Scope pattern {p!r}: invalid regular expression: {e}") from None
        if isinstance(self.weights, dict):
            object.__setattr__(self, "weights", QuantSpec.from_dict(self.weights))
        if self.weights is not None and not (
            isinstance(self.weights, QuantSpec) and not self.weights.dynamic
        ):
            raise ConfigError(f"Scope {p!r}: weights must be a static QuantSpec: {self.weights!r}")
        a = self.activations
        if isinstance(a, dict):
            object.__setattr__(self, "activations", a := QuantSpec.from_dict(a))
        if a is not None and not (isinstance(a, QuantSpec) and a.dynamic):
            raise ConfigError(f"Scope {p!r}: activations must be a QuantSpec(dynamic=True), got "
                              f"{a!r}; static activation specs are model-wide")
        if not isinstance(self.float, bool):
            raise ConfigError(f"Scope {p!r}: float must be a bool, got {self.float!r}")

    @property
    def label(self) -> str:
        """The pattern as text (a type by its class name)."""
        return self.pattern.__name__ if isinstance(self.pattern, type) else self.pattern

    def matches(self, name: str, module: Any) -> bool:
        """Whether the layer ``name`` (the module ``module``) is in this scope."""
        p = self.pattern
        if isinstance(p, type):
            return isinstance(module, p)
        if p.startswith("re:"):
            return re.fullmatch(p[3:], name) is not None
        return fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(type(module).__name__, p)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"pattern": self.label}
        if self.weights is not None:
            d["weights"] = self.weights.to_dict()
        if self.activations is not None:
            d["activations"] = self.activations.to_dict()
        if self.float:
            d["float"] = True
        return d

    @classmethod
    def of(cls, value: Any) -> Scope:
        """A scope from a :class:`Scope`, a ``(pattern, overrides)`` pair or a dict with a
        ``pattern`` key (a TOML ``[[scopes]]`` table)."""
        if isinstance(value, Scope):
            return value
        if isinstance(value, dict):
            value = dict(value)
            if "pattern" not in value:
                raise ConfigError(f"a scope needs a 'pattern', got {value!r}")
            pattern, overrides = value.pop("pattern"), value
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            pattern, overrides = value
        else:
            raise ConfigError(
                f"a scope is (pattern, overrides) or a Scope, got {value!r}; e.g. "
                "('_blocks.1*', {'weights': QuantSpec(bits=4, per_channel=True)})"
            )
        if not isinstance(overrides, dict):
            raise ConfigError(f"scope {pattern!r}: overrides must be a dict, got {overrides!r}")
        unknown = sorted(set(overrides) - set(SCOPE_KEYS))
        if unknown:
            raise ConfigError(
                f"scope {pattern!r}: unknown override(s) {unknown}; valid: {list(SCOPE_KEYS)}"
            )
        return cls(pattern, **overrides)


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
            ("fc", {"float": True})]``.
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
            the real inputs exceed the calibration data (see :mod:`ptqkit.analysis.coverage`).
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
        _positive_number(self.range_margin, "PTQConfig.range_margin", zero=True)
        if not isinstance(self.techniques, dict) or not all(
            isinstance(k, str) for k in self.techniques
        ):
            raise ConfigError(
                "PTQConfig.techniques must be a dict {technique name: its options}, got "
                f"{self.techniques!r}"
            )
        if isinstance(self.weights, dict):
            object.__setattr__(self, "weights", QuantSpec.from_dict(self.weights))
        if isinstance(self.activations, dict):
            object.__setattr__(self, "activations", QuantSpec.from_dict(self.activations))
        for name, kind in (
            ("adaround_options", AdaRoundOptions),
            ("bias_correction_options", BiasCorrectionOptions),
        ):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, _from_dict(kind, value, kind.__name__))
            elif not isinstance(value, kind):
                raise ConfigError(f"PTQConfig.{name} must be a {kind.__name__}, got {value!r}")
        if not isinstance(self.weights, QuantSpec):
            raise ConfigError(f"PTQConfig.weights must be a QuantSpec, got {self.weights!r}")
        self._check_gptq()
        if self.activations is not None and not isinstance(self.activations, QuantSpec):
            raise ConfigError(
                f"PTQConfig.activations must be a QuantSpec or None, got {self.activations!r}"
            )
        if not isinstance(self.calibration, str) or not self.calibration:
            # the name is checked against the registry where it is used (ptqkit.quantize)
            raise ConfigError(
                f"PTQConfig.calibration must name a calibrator, got {self.calibration!r}"
            )
        if self.weight_calibration not in ("minmax", "mse"):
            raise ConfigError(
                f"weight_calibration must be 'minmax' or 'mse', got {self.weight_calibration!r}"
            )
        if not isinstance(self.calibrator_options, dict):
            raise ConfigError("PTQConfig.calibrator_options must be a dict")
        if self.num_batches is not None and (
            isinstance(self.num_batches, bool)
            or not isinstance(self.num_batches, int)
            or self.num_batches < 1
        ):
            raise ConfigError(f"num_batches must be None or an int >= 1, got {self.num_batches!r}")
        if isinstance(self.skip, str):
            object.__setattr__(self, "skip", (self.skip,))
        elif isinstance(self.skip, list):
            object.__setattr__(self, "skip", tuple(self.skip))
        if not isinstance(self.skip, tuple) or not all(isinstance(s, str) for s in self.skip):
            raise ConfigError(f"skip must be a tuple of strings, got {self.skip!r}")
        if not isinstance(self.scopes, (tuple, list)):
            raise ConfigError(f"scopes must be a list of scopes, got {self.scopes!r}")
        object.__setattr__(self, "scopes", tuple(Scope.of(v) for v in self.scopes))
        for name in ("fold_bn", "cle", "adaround", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"PTQConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.bias_correction is True:
            object.__setattr__(self, "bias_correction", "empirical")
        if self.bias_correction not in (False, "empirical", "affine", "analytic", "auto"):
            raise ConfigError(
                "bias_correction must be False, True, 'empirical', 'affine', 'analytic' or "
                "'auto', "
                f"got {self.bias_correction!r}"
            )
        if (
            isinstance(self.adaround_iters, bool)
            or not isinstance(self.adaround_iters, int)
            or (self.adaround_iters < 1)
        ):
            raise ConfigError(f"adaround_iters must be an int >= 1, got {self.adaround_iters!r}")
        if self.smoothquant is not None and not (
            isinstance(self.smoothquant, (int, float))
            and not isinstance(self.smoothquant, bool)
            and 0.0 <= self.smoothquant <= 1.0
        ):
            raise ConfigError(f"smoothquant must be None or in [0, 1], got {self.smoothquant!r}")
        if self.max_degradation is not None and not (
            isinstance(self.max_degradation, (int, float))
            and not isinstance(self.max_degradation, bool)
            and self.max_degradation >= 0
        ):
            raise ConfigError(f"max_degradation must be >= 0, got {self.max_degradation!r}")
        if self.min_sqnr_db is not None and not (
            isinstance(self.min_sqnr_db, (int, float))
            and not isinstance(self.min_sqnr_db, bool)
            and math.isfinite(self.min_sqnr_db)
        ):  # NaN compares false with everything: the fallback would silently ignore the target
            raise ConfigError(f"min_sqnr_db must be a finite number, got {self.min_sqnr_db!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")

    def _check_gptq(self) -> None:
        """``gptq``: True/False/dict spellings, its type, and what it cannot be combined with;
        ``group_size`` is a weight setting only."""
        g: Any = self.gptq
        if g is True or g is False:
            object.__setattr__(self, "gptq", GPTQOptions() if g else None)
        elif isinstance(g, dict):
            object.__setattr__(self, "gptq", _from_dict(GPTQOptions, g, "GPTQOptions"))
        elif g is not None and not isinstance(g, GPTQOptions):
            raise ConfigError(f"PTQConfig.gptq must be None or a GPTQOptions, got {g!r}")
        if self.gptq is not None and self.adaround is True:
            raise ConfigError(
                "gptq and adaround both choose the integer weights: set one of them "
                "(gptq=None or adaround=False)"
            )
        if self.weights.dynamic:
            raise ConfigError("weights cannot be dynamic=True (that is for activations)")
        if isinstance(self.activations, QuantSpec) and self.activations.group_size is not None:
            raise ConfigError(
                "PTQConfig.activations: group_size is for weights only (group-wise scales "
                "along a layer's input dimension); set activations.group_size=None"
            )

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
        return _from_dict(cls, d, "PTQConfig")

    def replace(self, **changes: Any) -> PTQConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _from_dict(cls: type, d: dict[str, Any], what: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be built from a dict, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {what} key(s): {unknown}; valid keys: {sorted(names)}")
    return cls(**d)
