"""Per-tensor and per-layer settings: :class:`QuantSpec` (how one tensor is quantized) and
:class:`Scope` (the overrides a pattern of layers gets). Frozen dataclasses, validated on
construction, round-tripping through plain dicts (``to_dict`` / ``from_dict``); unknown keys
are an error. :mod:`ptqkit.config` re-exports both (``from ptqkit.config import QuantSpec``
keeps working).

Low level: imports only :mod:`ptqkit.errors`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

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
        return from_fields(cls, d, "QuantSpec")


#: what a scope can override (see :class:`Scope`)
SCOPE_KEYS = ("weights", "activations", "float", "techniques")


@dataclass(frozen=True)
class Scope:
    """Per-layer settings: the Conv/Linear layers that ``pattern`` matches get these overrides.

    ``pattern`` matches a layer by its module name (``fnmatch`` glob, e.g. ``"_blocks.1*"``;
    ``"re:..."`` for a regular expression, matched in full) or by its class name (``"Linear"``;
    from Python also a module type, ``nn.Linear``, which matches subclasses). Overrides:

    * ``weights``: the layer's weight spec (e.g. ``QuantSpec(bits=4, per_channel=True)``);
    * ``activations``: a dynamic spec for the (Linear) layer's input; its output is left to
      its consumers (static activation specs are model-wide);
    * ``float``: ``True`` leaves the layer in float (as ``skip`` does);
    * ``techniques``: registered techniques by name, as in :attr:`PTQConfig.techniques`, each
      ``False`` (off for these layers) or ``True`` (on again: undoes an earlier scope's
      ``False``), e.g. ``{"bias_correction": False, "adaround": False}``. A scope cannot turn
      on a technique the config leaves off, nor give a layer its own options. The names are
      checked against the registry when :func:`ptqkit.quantize` starts (only the techniques
      that work layer by layer take them: ``Technique.per_layer``).

    In :attr:`PTQConfig.scopes` the scopes apply in order, the last match winning per override
    (for ``techniques``: per technique, :func:`technique_scope`);
    a pattern that matches no quantizable layer of the model is a :class:`ConfigError` (raised
    by :func:`ptqkit.quantize`, which knows the model). Every layer's effective settings are in
    ``ptq_info.layer_settings``.
    """

    pattern: Any  # str, or an nn.Module subclass
    weights: QuantSpec | None = None
    activations: QuantSpec | None = None
    float: bool = False
    techniques: dict[str, bool] = dataclasses.field(default_factory=dict)

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
        object.__setattr__(self, "techniques", _switches(self.techniques, self.label))

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
        if self.techniques:
            d["techniques"] = dict(self.techniques)
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


def _switches(value: Any, label: str) -> dict[str, bool]:
    """A scope's ``techniques``: a copy of a dict {technique name: ``True`` / ``False``}."""
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"Scope {label!r}: techniques must be a dict {{technique name: False}}, got {value!r}"
        )
    for name, on in value.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"Scope {label!r}: techniques: a name must be a string, got {name!r}")
        if not isinstance(on, bool):
            raise ConfigError(
                f"Scope {label!r}: techniques[{name!r}] must be False (off for these layers) or "
                f"True (on again), got {on!r}; a technique's options are model-wide "
                "(PTQConfig), a scope only turns it off or back on"
            )
    return dict(value)


def technique_scope(
    scopes: Sequence[Scope], technique: str, name: str, layer: Any
) -> Scope | None:
    """The scope that decides whether ``technique`` runs on the layer ``name`` (the float
    module ``layer``): the last of ``scopes`` that matches it and names ``technique``, or
    ``None`` (no scope says: the config decides). The technique is off for the layer when that
    scope says ``False``."""
    found = None
    for sc in scopes:
        if technique in sc.techniques and sc.matches(name, layer):
            found = sc
    return found


def from_fields(cls: type, d: dict[str, Any], what: str) -> Any:
    """``cls(**d)`` for a dataclass ``cls``, a :class:`ConfigError` naming ``what`` and the
    valid keys when ``d`` is not a dict or has a key that is not a field."""
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be built from a dict, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {what} key(s): {unknown}; valid keys: {sorted(names)}")
    return cls(**d)


__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "SCOPE_KEYS",
    "QuantSpec",
    "Scope",
    "from_fields",
    "technique_scope",
]
