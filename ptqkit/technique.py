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
  are tried in, and, for a recipe that depends on the model or on the incumbent, ``applies``
  and ``changes_for``, read from a :class:`ModelView` of the base trial) and ``resolve``: the
  config it turned out to run (``"auto"`` modes), so that tune recognizes two ways of writing
  one recipe.
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
class LayerView:
    """One quantized layer as :func:`ptqkit.tune`'s base trial saw it: its name, whether it
    wraps an ``nn.Linear``, ``out`` outputs, ``k`` inputs per output (a conv's
    ``C_in/groups·kh·kw``), ``groups``, and ``rows``: the input rows it reads per calibration
    sample (a Linear's tokens, a conv's output positions; 0 when no data reached it). Its
    multiply-adds per sample are ``rows·out·k``."""

    name: str
    linear: bool
    out: int
    k: int
    groups: int
    rows: float

    @property
    def macs(self) -> float:
        return self.rows * self.out * self.k


@dataclass(frozen=True)
class ModelView:
    """What a model-dependent candidate (:attr:`Candidate.applies`) and a cost estimate from
    the layers' work (:attr:`CostBasis.view`) read of the model: its quantized ``layers``, the
    number of calibration ``samples``, and the base trial's quantized ``model`` itself (for a
    technique that needs to look at its graph)."""

    layers: tuple[LayerView, ...]
    samples: int
    model: Any = None

    def linear_share(self) -> float:
        """The share of the quantized layers' multiply-adds done by ``nn.Linear`` layers."""
        total = sum(lv.macs for lv in self.layers)
        return sum(lv.macs for lv in self.layers if lv.linear) / total if total > 0 else 0.0


@dataclass(frozen=True)
class Candidate:
    """A named change of config fields tried by :func:`ptqkit.tune` (``changes`` are
    :meth:`PTQConfig.replace` arguments); ``rank`` orders the registered ones (lower first).

    Two hooks make a candidate depend on the model and on the recipe it is applied to:

    * ``applies(view, config)``: ``None`` when the candidate applies to the model
      (:class:`ModelView` of the base trial) under ``config`` (the incumbent recipe), else the
      reason it does not (tune records it as skipped with that reason and does not run it);
    * ``changes_for(config)``: the changes computed from the incumbent ``config`` (e.g. one
      more scope appended to ``config.scopes``, one more entry in ``config.techniques``),
      used instead of the fixed ``changes``.
    """

    name: str
    changes: Mapping[str, Any] = field(default_factory=dict)
    rank: float = math.inf
    applies: Callable[[ModelView, PTQConfig], str | None] | None = None
    changes_for: Callable[[PTQConfig], Mapping[str, Any]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a candidate needs a name, got {self.name!r}")
        if not isinstance(self.changes, Mapping):
            raise ConfigError(
                f"candidate {self.name!r}: changes must be a dict of PTQConfig fields"
            )
        self._no_targets(self.changes)

    def _no_targets(self, changes: Mapping[str, Any]) -> None:
        targets = {"max_degradation", "min_sqnr_db"} & set(changes)
        if targets:
            raise ConfigError(
                f"candidate {self.name!r} sets {sorted(targets)}: give the fallback target in the "
                "config passed to tune (it runs last, on the best recipe)"
            )

    def skip_reason(self, view: ModelView | None, config: PTQConfig) -> str | None:
        """Why the candidate does not apply to the model seen in ``view`` under ``config``
        (``None``: it applies; always ``None`` without ``applies`` or without a view)."""
        if self.applies is None or view is None:
            return None
        return self.applies(view, config)

    def apply(self, config: PTQConfig) -> PTQConfig:
        changes = self.changes if self.changes_for is None else self.changes_for(config)
        self._no_targets(changes)
        try:
            return config.replace(**dict(changes))
        except TypeError as e:  # an unknown field name
            raise ConfigError(f"candidate {self.name!r}: {e}") from None


@dataclass(frozen=True)
class CostBasis:
    """What a cost estimate is made from: the seconds of one calibration pass (``pass_s``), the
    number of quantized layers, and, when known, AdaRound's optimization estimate, the layers'
    shapes and rows (``view``) and the machine's matrix-product rate (``mm_rate``)."""

    pass_s: float
    layers: int
    adaround_s: Callable[[PTQConfig], float] | None = None
    #: the base trial's layers and calibration samples, for an estimate from the layers' work
    view: ModelView | None = None
    #: this machine's multiply-adds per second (probed on first call), for the same
    mm_rate: Callable[[], float] | None = None


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
    "LayerView",
    "ModelView",
    "Phase",
    "Technique",
    "iterating_again",
    "register",
    "registered",
    "run_stages",
    "tapping",
    "unregister",
]
