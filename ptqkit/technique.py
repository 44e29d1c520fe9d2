"""A technique of :func:`ptqkit.quantize`, as one registered object, and the registry.

A :class:`Technique` says, in one place, everything the rest of ptqkit needs to know about it:

* ``run(ctx)``, and when it runs: ``order`` (its place in the pipeline) and ``enabled(config)``;
* ``phase``: ``"prefix"`` (before the calibration pass: its result does not depend on how the
  ranges are solved, so every recipe :func:`ptqkit.tune` tries that agrees on its ``fields``
  shares one run of it, :mod:`ptqkit.recipe.prefix`), ``"calibrate"`` (the one pass over the
  data) or ``"solve"`` (after it: run once per recipe);
* ``fields``: the :class:`~ptqkit.PTQConfig` fields it reads (a prefix technique's fields are
  the key under which a prefix is shared) and ``options``: its typed, frozen options dataclass;
* what it takes from the calibration pass instead of a pass of its own (``tap``, NNCF's
  *statistic points*: the hooks it holds open while the one pass runs; ``needs_tap(config)``;
  ``share_tap(config)``: the config whose tap serves every variant, for a shared prefix), and
  whether it iterates the data *again* (``again(config)``: a one-shot iterator cannot serve it);
* its cost for :func:`ptqkit.tune`: ``cost_key(config)`` (the name its time is measured and
  estimated under, ``None`` when this config does not pay for it as an option), a prior in
  calibration passes per key (``prior_passes``) or an ``estimate`` from the layers' work;
* the recipes it adds to tune's search (``candidates``, each with a ``rank``: the order they
  are tried in) and ``resolve``: the config it turned out to run (``"auto"`` modes), so that
  tune recognizes two ways of writing one recipe.
* ``per_layer``: whether a scope can turn it off for some layers (``Scope.techniques``).

Adding a technique is writing one module in :mod:`ptqkit.techniques` that calls
:func:`register`; the pipeline, the prefix key, the cost model and the candidate list are read
from the registry. A technique's ``name`` is the key of its time in ``PTQInfo.stages``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import PTQConfig
from .errors import ConfigError
from .records import Details
from .stage import Context

Phase = Literal["prefix", "calibrate", "solve"]
PHASES: tuple[Phase, ...] = ("prefix", "calibrate", "solve")


def _always(config: PTQConfig) -> bool:
    return True


def _never(config: PTQConfig) -> bool:
    return False


@dataclass(frozen=True)
class Candidate:
    """A named change of config fields tried by :func:`ptqkit.tune` (``changes`` are
    :meth:`PTQConfig.replace` arguments); ``rank`` orders the registered ones (lower first)."""

    name: str
    changes: Mapping[str, Any] = field(default_factory=dict)
    rank: float = math.inf

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a candidate needs a name, got {self.name!r}")
        if not isinstance(self.changes, Mapping):
            raise ConfigError(
                f"candidate {self.name!r}: changes must be a dict of PTQConfig fields"
            )
        targets = {"max_degradation", "min_sqnr_db"} & set(self.changes)
        if targets:
            raise ConfigError(
                f"candidate {self.name!r} sets {sorted(targets)}: give the fallback target in the "
                "config passed to tune (it runs last, on the best recipe)"
            )

    def apply(self, config: PTQConfig) -> PTQConfig:
        try:
            return config.replace(**dict(self.changes))
        except TypeError as e:  # an unknown field name
            raise ConfigError(f"candidate {self.name!r}: {e}") from None


@dataclass(frozen=True)
class CostBasis:
    """What a cost estimate is made from: the seconds of one calibration pass (``pass_s``), the
    number of quantized layers, and, when known, AdaRound's optimization estimate."""

    pass_s: float
    layers: int
    adaround_s: Callable[[PTQConfig], float] | None = None


@dataclass(frozen=True)
class Technique:
    """One step of :func:`ptqkit.quantize` and what tune and the prefix need to know of it
    (see the module docstring)."""

    name: str
    order: int
    run: Callable[[Context], None]
    enabled: Callable[[PTQConfig], bool] = _always
    again: Callable[[PTQConfig], bool] = _never
    phase: Phase = "solve"
    fields: tuple[str, ...] = ()
    options: type | None = None
    #: hooks held open during the calibration pass; what the context manager yields is kept in
    #: ``ctx.taps[name]`` for ``run``
    tap: Callable[[Context], AbstractContextManager[Any] | None] | None = None
    needs_tap: Callable[[PTQConfig], bool] | None = None  # default: ``enabled``
    share_tap: Callable[[PTQConfig], PTQConfig] | None = None
    cost_key: Callable[[PTQConfig], str | None] | None = None
    prior_passes: Mapping[str, float] = field(default_factory=dict)
    estimate: Callable[[PTQConfig, CostBasis], float] | None = None
    candidates: tuple[Candidate, ...] = ()
    #: the config it turned out to run, from its own record in ``PTQInfo.details`` (typed)
    resolve: Callable[[PTQConfig, Details], PTQConfig] | None = None
    reference: str = ""
    #: it works layer by layer, and a scope can turn it off for some layers
    #: (``Scope.techniques``): ``run`` leaves out :meth:`PTQConfig.off_layers`. ``False``: a
    #: scope that names it is a ConfigError (:func:`ptqkit.techniques.check`)
    per_layer: bool = False

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ConfigError(f"technique {self.name!r}: phase must be one of {PHASES}")

    def options_in(self, config: PTQConfig) -> Any:
        """Its options in ``config.techniques`` (``True`` or ``None``: the defaults; a dict:
        their fields), or ``None`` when the config does not turn it on (absent or ``False``)."""
        value = config.techniques.get(self.name, False)
        if value is False:
            return None
        if self.options is None:
            return value
        if value is True or value is None:
            return self.options()
        if isinstance(value, Mapping):
            try:
                return self.options(**value)
            except TypeError as e:
                raise ConfigError(f"techniques[{self.name!r}]: {e}") from None
        if not isinstance(value, self.options):
            raise ConfigError(
                f"techniques[{self.name!r}] must be a {self.options.__name__}, True or a dict "
                f"of its fields, got {type(value).__name__}"
            )
        return value

    def takes_tap(self, config: PTQConfig) -> bool:
        """Whether, with ``config``, ``run`` reads what its tap collected."""
        if self.tap is None or not self.enabled(config):
            return False
        return self.needs_tap(config) if self.needs_tap is not None else True

    def cost(self, config: PTQConfig) -> str | None:
        """The key tune measures and estimates this technique's time under, or ``None``."""
        if self.cost_key is None or not self.enabled(config):
            return None
        return self.cost_key(config)

    def prior_seconds(self, key: str, config: PTQConfig, basis: CostBasis) -> float:
        """Expected seconds under ``key`` before it was ever measured."""
        if self.estimate is not None:
            return self.estimate(config, basis)
        return self.prior_passes.get(key, 1.0) * basis.pass_s


_REGISTRY: dict[str, Technique] = {}


def register(technique: Technique) -> Technique:
    """Add ``technique`` to the registry (a second technique with the same name is refused,
    the same one registered again is kept once)."""
    known = _REGISTRY.get(technique.name)
    if known is not None and known is not technique:
        raise ConfigError(f"a technique named {technique.name!r} is already registered")
    if any(t.order == technique.order and t is not technique for t in _REGISTRY.values()):
        raise ConfigError(f"technique {technique.name!r}: order {technique.order} is taken")
    _REGISTRY[technique.name] = technique
    return technique


def unregister(name: str) -> None:
    """Remove the technique called ``name`` (a plugin's, or a test's)."""
    if _REGISTRY.pop(name, None) is None:
        raise ConfigError(f"no technique named {name!r} is registered")


def registered() -> tuple[Technique, ...]:
    """The registered techniques in pipeline order (:mod:`ptqkit.techniques` imports the
    built-in ones)."""
    return tuple(sorted(_REGISTRY.values(), key=lambda t: t.order))


def run_stages(stages: Sequence[Technique], ctx: Context) -> None:
    """Run the enabled ``stages`` in order, each timed into ``ctx.info.stages[name]`` (so no
    technique times itself)."""
    for stage in stages:
        if not stage.enabled(ctx.config):
            continue
        t0 = time.perf_counter()
        stage.run(ctx)
        stages_s = ctx.info.stages
        stages_s[stage.name] = stages_s.get(stage.name, 0.0) + time.perf_counter() - t0


def tapping(stages: Iterable[Technique], ctx: Context) -> ExitStack:
    """Open the taps of the ``stages`` that take one with ``ctx.config`` for the calibration
    pass: ``with tapping(stages, ctx): <calibrate>``."""
    stack = ExitStack()
    with stack:
        for stage in stages:
            if stage.takes_tap(ctx.config):
                assert stage.tap is not None
                tap = stage.tap(ctx)
                if tap is not None:
                    ctx.taps[stage.name] = stack.enter_context(tap)
        return stack.pop_all()


def iterating_again(stages: Iterable[Technique], config: PTQConfig) -> list[str]:
    """The enabled stages that run over the data after the calibration pass."""
    return [s.name for s in stages if s.enabled(config) and s.again(config)]


__all__ = [
    "Candidate",
    "CostBasis",
    "Phase",
    "Technique",
    "iterating_again",
    "register",
    "registered",
    "run_stages",
    "tapping",
    "unregister",
]
