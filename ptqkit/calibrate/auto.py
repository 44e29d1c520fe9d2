"""``calibration="auto"``: for each activation quantizer, the registered calibrator whose range
gives the smallest error at the output of the layer(s) that consume the quantized tensor.

The calibration pass has filled one :class:`~ptqkit.calibrate.stats.HistogramStats` per
quantizer. Every registered calibrator that can be solved from those statistics (its observer is
a histogram, or min/max which the histogram tracks as well: ``minmax``, ``percentile``, ``kl``,
``mse``, ``auto_percentile`` and any user-registered histogram calibrator; not ``ema``, which
needs the batch sequence) proposes a range. On the first :data:`AUTO_BATCHES` calibration
batches, run through the float network, each candidate range ``r`` is scored by the relative
error it causes at the output of every layer ``L`` that reads the tensor (through
value-preserving ops such as flatten or max-pooling, which commute with fake-quantization):

    e(r) = Σ_L ‖L(Q_r(u)) - L(u)‖² / ‖L(u)‖²        (u = the layer's float input)

with ``L`` in float. A quantizer that feeds no layer (an add, a concat, the network output), or
a per-channel activation spec, is scored on the tensor itself, ``‖Q_r(t) - t‖² / ‖t‖²``. The range
with the smallest error is set; the choice is recorded in ``info.chosen`` and the errors in
``info.details["auto"]``.

Under ``torch.distributed`` each rank scores the candidates on the first :data:`AUTO_BATCHES`
batches of its own shard, and the error sums are added over the ranks in rank order
(:func:`ptqkit.sync.add_up`): every rank picks the same ranges, those one process would pick
scoring the concatenation of these batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from ..config import PTQConfig
from ..data import run_model
from ..errors import CalibrationError, ConfigError
from ..info import PTQInfo
from ..quant.modules import QuantLayer, act_quants, float_mode, quant_layers
from ..quant.primitives import fake_quant, qparams
from ..sync import add_up, empty_shard, guard
from ..typed import submodule, target_name
from ..walk import batches
from .calibrators import CALIBRATORS, make_calibrator
from .stats import HistogramStats, MinMaxStats

#: calibration batches the candidate ranges are scored on
AUTO_BATCHES = 4


def read_from(cal: Any, hist: HistogramStats, *, exact: bool = False) -> bool:
    """Make the fresh calibrator ``cal`` solve its range from ``hist`` instead of observing on
    its own: a histogram calibrator reads ``hist``, a min/max one ``hist.minmax`` (which the
    histogram tracks). With ``exact``, only when ``cal``'s own observer would have been the same
    (same bins and channel axis). Returns whether ``cal`` now reads ``hist``; a calibrator that
    needs more than the histogram (``ema``: the batch sequence) does not."""
    st = getattr(cal, "stats", None)
    if isinstance(st, HistogramStats):
        if exact and (st.nbins != hist.nbins or st.axis != hist.axis):
            return False
        cal.stats = hist
    elif isinstance(st, MinMaxStats):
        if exact and st.axis != hist.axis:
            return False
        cal.stats = hist.minmax
    else:
        return False
    return True


def candidate_ranges(cal: Any, spec: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Range proposed by every registered calibrator solvable from ``cal.stats`` (a histogram)."""
    h = cal.stats
    out = {}
    for name in CALIBRATORS:
        try:
            c = make_calibrator(name, axis=cal.axis)
        except ConfigError:
            continue
        if not read_from(c, h):
            continue
        try:
            out[name] = c.compute_range(spec)
        except (CalibrationError, ConfigError):
            continue
    return out


def _feeders(model: nn.Module) -> dict[str, str]:
    """Quantizer name feeding each :class:`QuantLayer` (through value-preserving ops:
    :func:`ptqkit.graph.input_quantizer`, the walk placement's rule 3 uses too)."""
    from ..graph import input_quantizer

    if not isinstance(model, fx.GraphModule):
        return {n: f"{n}.input_quant" for n, m in quant_layers(model).items() if m.input_quant}
    feeds = {}
    for node in model.graph.nodes:
        if node.op != "call_module" or not isinstance(submodule(model, node), QuantLayer):
            continue
        q = input_quantizer(node, model)
        if q is not None:
            feeds[target_name(node)] = target_name(q)
    return feeds


def choose_ranges(
    qmodel: nn.Module,
    data: Iterable[Any],
    calibrators: dict[str, Any],
    config: PTQConfig,
    info: PTQInfo,
) -> dict[str, str]:
    """Set each calibrated quantizer's range to the best candidate (see the module docstring);
    returns ``{quantizer: chosen calibrator}``."""
    spec = config.activations
    if spec is None:  # no activation quantizer: nothing to choose
        return {}
    quants = act_quants(qmodel)
    cands: dict[str, dict[str, tuple]] = {}
    for qname, cal in calibrators.items():
        if qname in quants and isinstance(getattr(cal, "stats", None), HistogramStats):
            cands[qname] = candidate_ranges(cal, spec)
    qp = {qn: {c: qparams(lo, hi, spec) for c, (lo, hi) in cs.items()} for qn, cs in cands.items()}
    err = {qn: dict.fromkeys(cs, 0.0) for qn, cs in cands.items()}
    feeds = {} if spec.per_channel else _feeders(qmodel)
    feeds = {ln: qn for ln, qn in feeds.items() if qn in cands}
    on_layers = set(feeds.values())

    def score(qn: str, fn: Any, u: torch.Tensor) -> None:
        ref = fn(u)
        power = ref.double().pow(2).sum().clamp_min(1e-30)
        for c, (s, z) in qp[qn].items():
            e = (fn(fake_quant(u, s.to(u.device), z.to(u.device), spec)) - ref).double()
            err[qn][c] += float(e.pow(2).sum() / power)

    hooks = []
    layers = quant_layers(qmodel)
    for ln, qn in feeds.items():
        inner = layers[ln].layer
        hooks.append(
            layers[ln].register_forward_pre_hook(
                lambda m, a, qn=qn, inner=inner: score(qn, inner, a[0])
            )
        )
    for qn in cands:
        if qn not in on_layers:
            hooks.append(
                quants[qn].register_forward_pre_hook(
                    lambda m, a, qn=qn: score(qn, lambda t: t, a[0])
                )
            )
    seen = 0
    try:
        with guard("calibration='auto'"), torch.no_grad(), float_mode(qmodel):
            for i, args, kwargs in [] if empty_shard(data) else batches(data, config, qmodel):
                if seen >= AUTO_BATCHES:
                    break
                run_model(qmodel, i, args, kwargs)
                seen += 1
    finally:
        for h in hooks:
            h.remove()
    # under torch.distributed: the error sums (and batches) over all ranks, in rank order
    flat = {f"{qn}\t{c}": e for qn, es in err.items() for c, e in es.items()}
    totals = add_up("calibration='auto': errors", {**flat, "\tseen": seen})
    err = {qn: {c: totals[f"{qn}\t{c}"] for c in es} for qn, es in err.items()}
    seen = int(totals["\tseen"])
    chosen = {}
    for qn, cs in cands.items():
        if not cs:
            continue
        best = min(cs, key=lambda c: err[qn][c])
        quants[qn].set_range(*cs[best])
        chosen[qn] = best
    info.chosen.update(chosen)
    info.details["auto"] = {
        "batches": seen,
        "scored_on": {qn: ("layer outputs" if qn in on_layers else "tensor") for qn in cands},
        "errors": {qn: {c: e / max(seen, 1) for c, e in es.items()} for qn, es in err.items()},
    }
    return chosen


__all__ = ["AUTO_BATCHES", "candidate_ranges", "choose_ranges", "read_from"]
