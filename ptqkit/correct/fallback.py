"""Automatic float fallback: keep the most sensitive layers in float until a target is met.

Targets (both may be set; both must then hold), measured on the data given to
:func:`ptqkit.quantize` (the calibration data):

* ``max_degradation`` (points): ``metric(float) - metric(quantized) ≤ max_degradation``, the
  metric being top-1 accuracy with labeled batches, top-1 agreement with the float network
  otherwise (then ``100 - agreement ≤ max_degradation``; a warning says so);
* ``min_sqnr_db``: SQNR of the network's output against the float network ``≥ min_sqnr_db``.

A layer "kept in float" is a unit of :func:`~ptqkit.correct.units.layer_quantizers`: its
float weight (``QuantLayer.use_float()``), its output quantizer and an input quantizer that feeds
only it are switched off (listed in ``info.disabled``).

Search, smallest change first (at most ``2·layers + 1`` passes, never a loop without end):

1. measure every layer left alone in float; if some single layer meets the target, keep the one
   with the fewest weights;
2. otherwise add layers in order of their single-layer gain (largest first) until the target is
   met, then drop again, in reverse order, any added layer the target does not need;
3. if even every layer in float misses the target, warn and keep the best state measured.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import PTQConfig
from ..info import PTQInfo
from ..progress import progress
from ..quant.modules import act_quants, quant_layers
from ..records import FallbackRecord
from ..sync import active, guard
from .scoring import Evaluator, Score
from .units import layer_quantizers


def _describe(s: Score, metric: str) -> dict[str, float]:
    out = {"sqnr_db": round(s.sqnr_db, 3)}
    if metric != "sqnr_db":
        out[metric] = round(s.metric, 3)
    return out


def _targets(ev: Evaluator, config: PTQConfig, info: PTQInfo) -> tuple[float | None, ...]:
    """``(max_degradation, min_sqnr_db)`` that this model's output can be scored on (a target
    that cannot is dropped with a warning), warning too about samples left out."""
    max_deg, min_sqnr, metric = config.max_degradation, config.min_sqnr_db, ev.metric_name
    bad_in, bad_f = ev.excluded
    if bad_in or bad_f:
        info.warn(
            f"fallback: {bad_in + bad_f} calibration sample(s) left out of the scores "
            f"({bad_in} with a NaN/Inf input, {bad_f} where the float model itself returns "
            f"NaN/Inf); {ev.samples} scored"
        )
    if max_deg is not None and metric == "sqnr_db":
        info.warn(
            "fallback: max_degradation needs classification outputs ([N, classes]); this model's "
            "output is not, so only min_sqnr_db (if set) is used"
        )
        max_deg = None
    if min_sqnr is not None and ev.discrete:
        info.warn(
            "fallback: min_sqnr_db needs float outputs; this model returns integer/bool "
            "predictions (compared by equality: the SQNR of class indices means nothing), so "
            "only max_degradation (if set) is used"
        )
        min_sqnr = None
    if max_deg is not None and metric == "agreement":
        info.warn(
            "fallback: the data has no labels; max_degradation is applied to the top-1 agreement "
            "with the float model (degradation = 100 - agreement)"
        )
    return max_deg, min_sqnr


def fallback(qmodel: nn.Module, data: Iterable[Any], config: PTQConfig, info: PTQInfo) -> nn.Module:
    """Keep layers of ``qmodel`` in float until ``config``'s target holds (see the module
    docstring); records ``info.details["fallback"]``. Returns ``qmodel``. A layer a scope turns
    fallback off for (:meth:`PTQConfig.off_layers`) stays quantized: it is never measured nor
    chosen (``off_by_scope`` in the record).

    Under ``torch.distributed`` every score is computed over the shards of all ranks
    (:class:`~ptqkit.correct.ranks.RanksEvaluator`), so every rank keeps the same layers in
    float."""
    with guard("fallback"):
        return _fallback(qmodel, data, config, info)


@dataclass(frozen=True)
class _Goal:
    """The targets that hold for this model's output (see :func:`_targets`), scored by ``ev``."""

    ev: Evaluator
    max_deg: float | None
    min_sqnr: float | None

    def meets(self, s: Score) -> bool:
        ok = True
        if self.max_deg is not None:
            ok &= self.ev.float_metric - s.metric <= self.max_deg + 1e-9
        if self.min_sqnr is not None:
            ok &= s.sqnr_db >= self.min_sqnr
        return ok

    def goodness(self, s: Score) -> tuple[float, ...]:
        """What "better" compares: the metric (then SQNR) for a degradation target, else SQNR."""
        if self.max_deg is not None:
            return (s.metric,) if self.ev.discrete else (s.metric, s.sqnr_db)
        return (s.sqnr_db,)

    def wanted(self) -> str:
        want = []
        if self.max_deg is not None:
            want.append(f"at most {self.max_deg} points of {self.ev.metric_name} lost")
        if self.min_sqnr is not None:
            want.append(f"output SQNR at least {self.min_sqnr} dB")
        return ", ".join(want)


def _evaluator(qmodel: nn.Module, data: Iterable[Any], config: PTQConfig) -> Evaluator:
    """The scorer of the fallback search: over all ranks' shards under ``torch.distributed``."""
    if active():
        from .ranks import RanksEvaluator

        return RanksEvaluator(qmodel, data, config)
    return Evaluator(qmodel, data, config)


def _fallback(
    qmodel: nn.Module, data: Iterable[Any], config: PTQConfig, info: PTQInfo
) -> nn.Module:
    layers = quant_layers(qmodel)
    off = config.off_layers("fallback", layers)  # a scope's: never a candidate to keep in float
    layers = {n: q for n, q in layers.items() if n not in off}
    ev = _evaluator(qmodel, data, config)
    metric = ev.metric_name
    goal = _Goal(ev, *_targets(ev, config, info))
    target = {"max_degradation": goal.max_deg, "min_sqnr_db": goal.min_sqnr, "metric": metric}
    base = ev.measure()
    details: FallbackRecord = {
        "target": target,
        "float": ev.float_metric,
        "before": _describe(base, metric),
        "samples": ev.samples,
        **({"off_by_scope": off} if off else {}),
    }
    if goal.meets(base) or not layers:
        met = goal.meets(base)
        details.update({"met": met, "kept_float": [], "after": details["before"]})
        details["passes"] = ev.passes
        info.details["fallback"] = details
        if not layers:
            why = " (scopes turn fallback off for all of them)" if off else ""
            info.warn(f"fallback: the model has no quantized layer to keep in float{why}")
        return qmodel

    single = {
        n: ev.measure(floats=[n]) for n in progress(list(layers), config.progress, "fallback")
    }
    size = {n: layers[n].weight_fp.numel() for n in layers}
    chosen, final, tried = _search(goal, base, single, size)
    met = goal.meets(final)
    if not met:
        chosen, final = max(tried, key=lambda t: (goal.goodness(t[1]), -len(t[0])))
        info.warn(
            f"fallback: the target ({goal.wanted()}) cannot be met even with every layer in "
            f"float (activation quantizers outside layers, e.g. after adds, stay); keeping the "
            f"best state measured: {len(chosen)} layer(s) in float, {metric} "
            f"{final.metric:.2f} vs float {ev.float_metric:.2f}, output SQNR "
            f"{final.sqnr_db:.1f} dB"
        )
    kept = _keep_float(qmodel, info, chosen, ev, base, single, size)
    details.update({"met": met, "kept_float": kept, "after": _describe(final, metric)})
    details["passes"] = ev.passes
    info.details["fallback"] = details
    return qmodel


def _search(
    goal: _Goal, base: Score, single: dict[str, Score], size: dict[str, int]
) -> tuple[list[str], Score, list[tuple[list[str], Score]]]:
    """Steps 1-2 of the module docstring: ``(layers kept in float, their score, every state
    measured)``; the score may miss the goal (step 3 is the caller's)."""
    ev, goodness = goal.ev, goal.goodness
    meeting = [n for n, s in single.items() if goal.meets(s)]
    tried: list[tuple[list[str], Score]] = [([], base)] + [([n], s) for n, s in single.items()]
    if meeting:
        best = min(meeting, key=lambda n: (size[n], [-g for g in goodness(single[n])]))
        return [best], single[best], tried
    order = sorted(single, key=lambda n: (*tuple(-g for g in goodness(single[n])), size[n]))
    chosen: list[str] = []
    final = base
    for n in order:
        chosen.append(n)
        final = single[n] if len(chosen) == 1 else ev.measure(floats=chosen)
        tried.append((list(chosen), final))
        if goal.meets(final):
            break
    if goal.meets(final):
        for n in reversed(chosen[:-1]):  # drop what the target does not need
            rest = [m for m in chosen if m != n]
            s = ev.measure(floats=rest)
            tried.append((rest, s))
            if goal.meets(s):
                chosen, final = rest, s
    return chosen, final, tried


def _keep_float(
    qmodel: nn.Module,
    info: PTQInfo,
    chosen: list[str],
    ev: Evaluator,
    base: Score,
    single: dict[str, Score],
    size: dict[str, int],
) -> list[dict[str, Any]]:
    """Switch the ``chosen`` layers to float (weight, output and sole-input quantizers, listed in
    ``info.disabled``); returns the ``kept_float`` record, with why each was chosen."""
    layers, units, quants = quant_layers(qmodel), layer_quantizers(qmodel), act_quants(qmodel)
    metric = ev.metric_name
    kept = []
    for n in chosen:
        layers[n].use_float()
        for q in units.get(n, []):
            if q in quants:
                quants[q].mode = "off"
                info.disabled[q] = f"fallback: {n} kept in float"
        s = single[n]
        why = f"left alone in float: {metric} {base.metric:.2f} -> {s.metric:.2f}"
        if metric != "sqnr_db" and not ev.discrete:
            why += f", output SQNR {base.sqnr_db:.1f} -> {s.sqnr_db:.1f} dB"
        kept.append(
            {"layer": n, "params": int(size[n]), "quantizers": units.get(n, []), "why": why}
        )
    return kept


__all__ = ["fallback"]
