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
from typing import Any

from torch import nn

from ..config import PTQConfig
from ..info import PTQInfo
from ..progress import progress
from ..quant.modules import act_quants, quant_layers
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
    docstring); records ``info.details["fallback"]``. Returns ``qmodel``.

    Under ``torch.distributed`` every score is computed over the shards of all ranks
    (:class:`~ptqkit.correct.ranks.RanksEvaluator`), so every rank keeps the same layers in
    float."""
    with guard("fallback"):
        return _fallback(qmodel, data, config, info)


def _fallback(
    qmodel: nn.Module, data: Iterable[Any], config: PTQConfig, info: PTQInfo
) -> nn.Module:
    layers = quant_layers(qmodel)
    if active():
        from .ranks import RanksEvaluator

        ev: Evaluator = RanksEvaluator(qmodel, data, config)
    else:
        ev = Evaluator(qmodel, data, config)
    metric = ev.metric_name
    max_deg, min_sqnr = _targets(ev, config, info)

    def meets(s: Score) -> bool:
        ok = True
        if max_deg is not None:
            ok &= ev.float_metric - s.metric <= max_deg + 1e-9
        if min_sqnr is not None:
            ok &= s.sqnr_db >= min_sqnr
        return ok

    def goodness(s: Score) -> tuple[float, ...]:
        if max_deg is not None:
            return (s.metric,) if ev.discrete else (s.metric, s.sqnr_db)
        return (s.sqnr_db,)

    target = {"max_degradation": max_deg, "min_sqnr_db": min_sqnr, "metric": metric}
    base = ev.measure()
    details: dict[str, Any] = {
        "target": target,
        "float": ev.float_metric,
        "before": _describe(base, metric),
        "samples": ev.samples,
    }
    if meets(base) or not layers:
        details.update(met=meets(base), kept_float=[], after=details["before"], passes=ev.passes)
        info.details["fallback"] = details
        if not layers:
            info.warn("fallback: the model has no quantized layer to keep in float")
        return qmodel

    single = {
        n: ev.measure(floats=[n]) for n in progress(list(layers), config.progress, "fallback")
    }
    size = {n: layers[n].weight_fp.numel() for n in layers}
    meeting = [n for n, s in single.items() if meets(s)]
    tried: list[tuple[list[str], Score]] = [([], base)] + [([n], s) for n, s in single.items()]
    if meeting:
        chosen = [min(meeting, key=lambda n: (size[n], [-g for g in goodness(single[n])]))]
        final = single[chosen[0]]
    else:
        order = sorted(layers, key=lambda n: (*tuple(-g for g in goodness(single[n])), size[n]))
        chosen, final = [], base
        for n in order:
            chosen.append(n)
            final = single[n] if len(chosen) == 1 else ev.measure(floats=chosen)
            tried.append((list(chosen), final))
            if meets(final):
                break
        if meets(final):
            for n in reversed(chosen[:-1]):  # drop what the target does not need
                rest = [m for m in chosen if m != n]
                s = ev.measure(floats=rest)
                tried.append((rest, s))
                if meets(s):
                    chosen, final = rest, s
    met = meets(final)
    if not met:
        chosen, final = max(tried, key=lambda t: (goodness(t[1]), -len(t[0])))
        want = []
        if max_deg is not None:
            want.append(f"at most {max_deg} points of {metric} lost")
        if min_sqnr is not None:
            want.append(f"output SQNR at least {min_sqnr} dB")
        info.warn(
            f"fallback: the target ({', '.join(want)}) cannot be met even with every layer in "
            f"float (activation quantizers outside layers, e.g. after adds, stay); keeping the "
            f"best state measured: {len(chosen)} layer(s) in float, {metric} "
            f"{final.metric:.2f} vs float {ev.float_metric:.2f}, output SQNR "
            f"{final.sqnr_db:.1f} dB"
        )

    units = layer_quantizers(qmodel)
    quants = act_quants(qmodel)
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
    details.update(met=met, kept_float=kept, after=_describe(final, metric), passes=ev.passes)
    info.details["fallback"] = details
    return qmodel


__all__ = ["fallback"]
