"""The recipes :func:`ptqkit.tune` tries, and what each is expected to cost.

The candidates and their costs are read from the technique registry (:mod:`ptqkit.techniques`):
each technique lists the recipes it adds (with a rank) and how its cost is estimated. A
:class:`Candidate` is a named change of :class:`~ptqkit.PTQConfig` fields, applied with
``config.replace(**changes)`` to the best recipe found so far (a greedy search: each field is
settled in turn, in the order of the list). Alternatives of one setting change the same field,
so they compete with each other and with the incumbent; a change that gives a configuration
already measured is not run again.

:data:`CANDIDATES` (the default list: the registered candidates by rank) is ordered by the cost
of a whole trial, and within one cost class by the gain measured on this project's benchmarks
(bench/RECOVERY.md, issue 14): every trial pays a capture, a calibration pass and a scoring
pass, which on EfficientNet-Lite0 dwarf the few extra passes of most options, so there the order
of the options is what decides which fit in the budget.

1. a trial's worth: the ``mse`` activation calibrator (minmax → mse: +0.1 point of agreement on
   EfficientNet-Lite0), scale-and-bias correction (``affine``: one quantized pass over cached
   layer inputs; mse → mse + affine: 87.7% → 98.0% there, bench/ONEPASS.md), then
   ``percentile``, weight ranges by MSE search, mean-only bias correction (``empirical``) and
   data-free (``analytic``: BatchNorm statistics), cross-layer equalization on or off, and bias
   correction off again;
2. ``calibration="auto"`` (a calibrator per tensor; adds a scoring pass per candidate range on a
   few batches);
3. AdaRound (an optimization per layer: the most expensive, tried only if the budget allows);
4. the transformer techniques, each offered only where it applies (``Candidate.applies``, read
   from the base trial's layers; a candidate that does not apply is recorded as skipped with
   its reason): dynamic per-token activations on the ``nn.Linear`` layers (when Linear layers
   do at least half of the model's multiply-adds and the activations are static), and, for
   weights of at most 4 bits, GPTQ, AWQ (with nearest rounding) and AWQ + GPTQ (AWQ only where a
   quantized Linear reads a LayerNorm/RMSNorm output). They compete for the same fields
   (``gptq``, ``techniques``), so the paired test picks at most one of the weight choices.

The float fallback of the fewest layers meeting a target is not in the list: it runs last, on
the best recipe, when the config given to ``tune`` sets ``max_degradation`` or ``min_sqnr_db``.

Costs (:func:`stage_seconds`: each technique's ``cost_key``, ``prior_passes`` or ``estimate``)
are in measured units: ``pass_s``, the time of the calibration pass of the first (base) trial; a
stage already measured in an earlier trial costs what it cost then. The priors in the technique
modules are rough guesses (empirical bias correction, MSE weight ranges and AdaRound checked
against runs on the digits CNN and EfficientNet-Lite0) and only decide what is skipped before
the stage was measured once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..config import PTQConfig
from ..errors import ConfigError
from ..technique import Candidate, CostBasis, ModelView, Technique
from ..techniques import candidates, pipeline

#: the default recipes, in the order they are tried (see the module docstring)
CANDIDATES: tuple[Candidate, ...] = candidates()


def stages_of(config: PTQConfig) -> list[str]:
    """The cost keys of the optional techniques ``config`` runs (``Technique.cost``: bias
    correction with its mode, the MSE search of the weight ranges counted apart from the
    weights' rounding)."""
    return [k for t in pipeline() if (k := t.cost(config)) is not None]


def _owner(key: str) -> Technique:
    for t in pipeline():
        if t.cost_key is not None and key.split(":")[0] == t.name:
            return t
    raise ConfigError(f"no registered technique has the cost key {key!r}")


def stage_seconds(
    stage: str,
    config: PTQConfig,
    pass_s: float,
    layers: int,
    measured: Mapping[str, float],
    adaround_s: Callable[[PTQConfig], float] | None = None,
    view: ModelView | None = None,
    mm_rate: Callable[[], float] | None = None,
) -> float:
    """Expected seconds of the cost key ``stage`` under ``config``: the measured time if any
    earlier trial ran it, otherwise its technique's prior (``Technique.prior_seconds``; for
    AdaRound ``adaround_s(config)``, the estimate from the layers' shapes, when given; for GPTQ
    and AWQ the estimate from the base trial's layers and rows, ``view``, at the machine's
    ``mm_rate``)."""
    if stage in measured:
        return measured[stage]
    basis = CostBasis(pass_s, layers, adaround_s, view, mm_rate)
    return _owner(stage).prior_seconds(stage, config, basis)


def measured_stages(stages: Mapping[str, float], config: PTQConfig) -> dict[str, float]:
    """``PTQInfo.stages`` of a trial keyed like :func:`stages_of` (bias correction with mode)."""
    out = {}
    for t in pipeline():
        key = t.cost(config)
        if key is not None and t.name in stages:
            out[key] = stages[t.name]
    return out


__all__ = ["CANDIDATES", "Candidate", "measured_stages", "stage_seconds", "stages_of"]
