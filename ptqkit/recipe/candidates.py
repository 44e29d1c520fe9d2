"""The recipes :func:`ptqkit.tune` tries, and what each is expected to cost.

A :class:`Candidate` is a named change of :class:`~ptqkit.PTQConfig` fields, applied with
``config.replace(**changes)`` to the best recipe found so far (a greedy search: each field is
settled in turn, in the order of the list). Alternatives of one setting change the same field,
so they compete with each other and with the incumbent; a change that gives a configuration
already measured is not run again.

:data:`CANDIDATES` (the default list) is ordered by the cost of a whole trial, and within one
cost class by the gain measured on this project's benchmarks (bench/RECOVERY.md, issue 14):
every trial pays a capture, a calibration pass and a scoring pass, which on EfficientNet-Lite0
dwarf the few extra passes of most options, so there the order of the options is what decides
which fit in the budget.

1. a trial's worth: the ``mse`` activation calibrator (minmax → mse: +0.1 point of agreement on
   EfficientNet-Lite0), scale-and-bias correction (``affine``: one quantized pass over cached
   layer inputs; mse → mse + affine: 87.7% → 98.0% there, bench/ONEPASS.md), then
   ``percentile``, weight ranges by MSE search, mean-only bias correction (``empirical``) and
   data-free (``analytic``: BatchNorm statistics), cross-layer equalization on or off, and bias
   correction off again;
2. ``calibration="auto"`` (a calibrator per tensor; adds a scoring pass per candidate range on a
   few batches);
3. AdaRound (an optimization per layer: the most expensive, tried only if the budget allows).

The float fallback of the fewest layers meeting a target is not in the list: it runs last, on the
best recipe, when the config given to ``tune`` sets ``max_degradation`` or ``min_sqnr_db``.

Costs (:func:`stage_seconds`) are in measured units: ``pass_s``, the time of the calibration pass
of the first (base) trial; a stage already measured in an earlier trial costs what it cost then.
The priors below are rough guesses (empirical bias correction, MSE weight ranges and AdaRound
checked against runs on the digits CNN and EfficientNet-Lite0) and only decide what is skipped
before the stage was measured once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import PTQConfig
from ..errors import ConfigError

#: the optional stages of :func:`ptqkit.quantize` (keys of ``PTQInfo.stages``)
OPTIONAL_STAGES = ("cle", "smoothquant", "auto", "adaround", "bias_correction", "fallback")
#: prior cost of a stage, in calibration passes (``pass_s``), before it was ever measured
PRIOR_PASSES = {
    "cle": 0.2,
    "smoothquant": 1.5,
    "auto": 3.0,
    "bias_correction:analytic": 0.2,
    "bias_correction:empirical": 1.0,
    "bias_correction:affine": 1.0,
    "weights:mse": 0.5,
}
#: prior seconds of one AdaRound optimization step of one layer, when the layers' shapes are not
#: known (with them, :func:`ptqkit.correct.cost.adaround_seconds`: the cost grows with the
#: weights, not the layers: 220 ms a step for a 1024→1024 k=3 Conv1d on 2 cores)
ADAROUND_STEP_S = 2e-3
#: prior cost of the fallback, in quantized passes over the calibration data per layer
FALLBACK_PASSES_PER_LAYER = 1.0


@dataclass(frozen=True)
class Candidate:
    """A named change of config fields (``changes`` are :meth:`PTQConfig.replace` arguments)."""

    name: str
    changes: Mapping[str, Any] = field(default_factory=dict)

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


#: the default recipes, in the order they are tried (see the module docstring)
CANDIDATES: tuple[Candidate, ...] = (
    Candidate("mse", {"calibration": "mse"}),
    Candidate("affine BC", {"bias_correction": "affine"}),
    Candidate("percentile", {"calibration": "percentile"}),
    Candidate("mse weights", {"weight_calibration": "mse"}),
    Candidate("empirical BC", {"bias_correction": "empirical"}),
    Candidate("analytic BC", {"bias_correction": "analytic"}),
    Candidate("CLE", {"cle": True}),
    Candidate("no CLE", {"cle": False}),
    Candidate("no BC", {"bias_correction": False}),
    Candidate("auto", {"calibration": "auto"}),
    Candidate("AdaRound", {"adaround": True}),
)


def stages_of(config: PTQConfig) -> list[str]:
    """The optional stages ``config`` runs (bias correction with its mode; the MSE search of
    the weight ranges, part of the ``weights`` stage, counted apart: 14 s on EfficientNet-Lite0)."""
    on = {
        "cle": config.cle,
        "smoothquant": config.smoothquant is not None,
        "auto": config.calibration == "auto",
        "adaround": config.adaround,
        f"bias_correction:{config.bias_correction}": bool(config.bias_correction),
        "weights:mse": config.weight_calibration == "mse" and not config.adaround,
        "fallback": config.max_degradation is not None or config.min_sqnr_db is not None,
    }
    return [s for s, yes in on.items() if yes]


def stage_seconds(
    stage: str,
    config: PTQConfig,
    pass_s: float,
    layers: int,
    measured: Mapping[str, float],
    adaround_s: Callable[[PTQConfig], float] | None = None,
) -> float:
    """Expected seconds of ``stage`` under ``config``: the measured time if any earlier trial
    ran it, otherwise its prior. AdaRound's prior: ``adaround_s(config)``, the estimate of its
    optimization from the layers' shapes (:mod:`ptqkit.correct.cost`), when given, else
    :data:`ADAROUND_STEP_S` per layer and step; plus two passes over the data."""
    if stage in measured:
        return measured[stage]
    if stage == "adaround":
        steps = (
            adaround_s(config)
            if adaround_s is not None
            else config.adaround_iters * layers * ADAROUND_STEP_S
        )
        return steps + 2 * pass_s
    if stage == "fallback":
        return (2 * layers + 1) * FALLBACK_PASSES_PER_LAYER * pass_s
    return PRIOR_PASSES.get(stage, 1.0) * pass_s


def measured_stages(stages: Mapping[str, float], config: PTQConfig) -> dict[str, float]:
    """``PTQInfo.stages`` of a trial keyed like :func:`stages_of` (bias correction with mode)."""
    out = {}
    for s in stages_of(config):
        key = s.split(":")[0]  # "bias_correction:empirical" -> "bias_correction"
        if key in stages:
            out[s] = stages[key]
    return out
