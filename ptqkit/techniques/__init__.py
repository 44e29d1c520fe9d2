"""The built-in techniques of :func:`ptqkit.quantize`, one module each; every module registers
its :class:`~ptqkit.technique.Technique` when imported, and this package imports them all.

Everything that used to be a hand-kept list is read from the registry here: the pipeline
(:func:`pipeline`), the techniques a shared prefix runs and the config fields it is keyed on
(:func:`prefix_fields`), the recipes :func:`ptqkit.tune` tries (:func:`candidates`), the cost
keys and priors (:mod:`ptqkit.recipe.candidates`), and what an ``"auto"`` setting turned out
to be (:func:`resolve`).
"""

from __future__ import annotations

import importlib
import pkgutil

from ..config import PTQConfig
from ..errors import ConfigError
from ..records import Details
from ..technique import Candidate, Phase, Technique, registered


def _load() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_load()


def pipeline() -> tuple[Technique, ...]:
    """Every registered technique, in pipeline order."""
    return registered()


def in_phase(phase: Phase) -> tuple[Technique, ...]:
    """The techniques of one phase (``"prefix"``, ``"calibrate"``, ``"solve"``), in order."""
    return tuple(t for t in registered() if t.phase == phase)


def technique(name: str) -> Technique:
    """The registered technique called ``name``."""
    for t in registered():
        if t.name == name:
            return t
    raise ConfigError(f"no technique named {name!r}; known: {[t.name for t in registered()]}")


def candidates() -> tuple[Candidate, ...]:
    """The recipes the registered techniques add to tune's search, by rank."""
    found = [c for t in registered() for c in t.candidates]
    return tuple(sorted(found, key=lambda c: c.rank))


def prefix_fields() -> tuple[str, ...]:
    """The config fields the techniques before and at the calibration pass read: recipes that
    agree on them can share one prefix (:mod:`ptqkit.recipe.prefix`)."""
    out: list[str] = []
    for t in registered():
        if t.phase != "solve":
            out += [f for f in t.fields if f not in out]
    return tuple(out)


def check(config: PTQConfig) -> None:
    """Every name in ``config.techniques`` is a registered technique, with valid options; every
    technique a scope turns off or on (``Scope.techniques``) is a registered one that works
    layer by layer (``Technique.per_layer``)."""
    known = {t.name: t for t in registered()}
    for name in config.techniques:
        if name not in known:
            raise ConfigError(
                f"PTQConfig.techniques: no technique named {name!r}; registered: {sorted(known)}"
            )
        known[name].options_in(config)
    per_layer = sorted(n for n, t in known.items() if t.per_layer)
    for sc in config.scopes:
        for name in sc.techniques:
            if name not in known:
                raise ConfigError(
                    f"scope {sc.label!r}: techniques: no technique named {name!r}; registered: "
                    f"{sorted(known)} (a scope can turn off: {per_layer})"
                )
            if not known[name].per_layer:
                raise ConfigError(
                    f"scope {sc.label!r}: technique {name!r} cannot be turned off for some "
                    f"layers (it does not work layer by layer); a scope can turn off: "
                    f"{per_layer}; to leave the layers in float: float=True"
                )


def resolve(config: PTQConfig, details: Details) -> PTQConfig:
    """``config`` with each technique's ``"auto"`` setting replaced by what it did (read from
    ``PTQInfo.details``)."""
    for t in registered():
        if t.resolve is not None and t.enabled(config):
            config = t.resolve(config, details)
    return config


__all__ = ["candidates", "check", "in_phase", "pipeline", "prefix_fields", "resolve", "technique"]
