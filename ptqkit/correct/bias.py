"""Bias correction (Nagel et al. 2019, section 4.2): quantizing a layer's weights, ``W̃ = W + ε``,
shifts the expected value of its output by ``E[ε·x] = ε·E[x]``; subtracting that shift from the
layer's (float) bias removes the systematic part of the error.

* ``"empirical"``: for each quantized layer in execution order, ``b ← b + E[y] - E[ỹ]`` where
  ``E[y]`` is the per-channel mean of the float network's layer output and ``E[ỹ]`` that of the
  quantized network (quantized weights and activations upstream, earlier corrections applied) over
  the calibration data (its first ``BiasCorrectionOptions.samples`` samples: a per-channel mean over
  that many samples × positions is already precise). The float means are taken during the
  calibration pass (:func:`float_means_tap`; a float pass of their own when :func:`correct_bias` is
  called alone). The quantized ones need, at layer ``ℓ``, all samples propagated through the layers
  before ``ℓ`` *with their corrections*; a traced model is therefore run node by node over all those
  samples at once (:func:`ptqkit.walk.propagate`, cached layer inputs, spilled to disk past a memory
  budget): at each layer its mean is taken, its bias corrected, and only then does it run for the
  layers after it. One quantized pass, ``O(depth)`` forward work, and exactly the sequential
  algorithm. An untraced model falls back to one pass per layer that stops right after it
  (``O(depth²)``). Under ``torch.distributed`` each rank takes its own shard's first ``samples``
  samples, and every sum and count is added over the ranks (:func:`ptqkit.sync.add_up`, in rank
  order) before a mean is taken: each layer gets the same correction on every rank, the one a single
  process would compute over the union of the shards (up to float64 rounding: the sums are grouped
  per rank).
* ``"affine"``: the same pass, but each output channel gets the least-squares scale *and* bias
  against the float output (:mod:`ptqkit.correct.affine`): mean matching cannot undo a gain
  lost upstream, the scale (folded into the per-channel weight scale) can.
* ``"analytic"`` (data-free): ``b ← b - ε·E[x]`` with ``E[x]`` propagated through the graph from
  the BatchNorm statistics recorded at folding time (a folded layer's output is taken as
  ``N(β, γ²)`` per channel; after a clipping activation ``clamp(·, a, b)`` its mean is the
  clipped-normal mean ``a·Φ(α) + b·(1 - Φ(β')) + μ·(Φ(β') - Φ(α)) + σ·(φ(α) - φ(β'))`` with
  ``α = (a - μ)/σ``, ``β' = (b - μ)/σ``; adds sum means, and variances as if independent;
  average pooling and flatten keep the mean). Layers whose input has no such statistics (the
  first layer, inputs after max-pooling, ...) are left as they are and listed.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any, cast

import torch
from torch import fx, nn

from ..config import BiasCorrectionOptions, PTQConfig
from ..data import channels_last, run_model
from ..errors import DataError, ModelError
from ..info import PTQInfo
from ..progress import progress
from ..quant.modules import QuantLayer, float_mode, out_channels, quant_layers
from ..records import BiasCorrectionRecord
from ..sync import add_up, empty_shard, from_data, guard
from ..walk import batches, can_propagate, layer_order, propagate, run_until, stop_after
from .affine import Paired, can_scale, pair, rescale
from .affine import add_to_bias as _add_to_bias
from .analytic import analytic as _analytic
from .analytic import clipped_normal_mean
from .check import LayerCheck, check
from .means import FloatMeans, Mean, left_out, over_ranks, without_samples

#: the modes that read the calibration data (and so the tap of the calibration pass)
DATA_MODES = ("empirical", "affine", "auto")


def _shift(
    y: torch.Tensor, layer: nn.Module, delta: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``y`` (times ``scale``) plus ``delta`` per output channel: the layer's output with its
    bias moved by ``delta`` (and its weight scale times ``scale``)."""
    shape = [1] * y.dim()
    shape[-1 if isinstance(layer, nn.Linear) else 1] = -1
    d = delta.to(y.device, y.dtype).reshape(shape)
    a = None if scale is None else scale.to(y.device, y.dtype).reshape(shape)
    # the propagation engine owns its cached outputs: change them in place (no copy) when no
    # autograd graph hangs on them
    if y.requires_grad:
        return (y if a is None else y * a) + d
    return (y if a is None else y.mul_(a)).add_(d)


# -- empirical ---------------------------------------------------------------------------------
def _empirical(
    qmodel: nn.Module,
    data: Iterable[Any] | None,
    config: PTQConfig,
    info: PTQInfo,
    options: BiasCorrectionOptions,
    float_means: FloatMeans | None = None,
    affine: bool = False,
    off: Collection[str] = (),
) -> dict[str, Any]:
    """Empirical (``affine``: affine) bias correction of ``qmodel`` in place, in the layers'
    execution order, each layer from the quantized network's output mean with the earlier
    corrections applied (``b ← b + E[y] - E[ỹ]``, the module docstring); the layers in ``off``
    (turned off by a scope) are left as they are. Returns the record."""
    if data is None:
        raise DataError(
            "empirical bias correction needs calibration data; pass data, or use "
            "bias_correction='analytic' (data-free, from BatchNorm statistics)"
        )
    layers = quant_layers(qmodel)
    drop = left_out(info)  # the outlier samples calibration left out: left out here too
    float_means, passes = _float_means(qmodel, data, config, options, float_means, drop)
    feeds = [channels_last(*b) for b in float_means.feeds]  # (faster convs, same statistics)
    order, ref, shared = _order(qmodel, data, config, float_means, layers, off, feeds)
    fix = _Corrector(layers, ref, affine)
    engine: dict[str, Any] | None = None
    if can_propagate(qmodel, order):
        engine = _propagated(qmodel, feeds, order, float_means.picks, fix, config, options)
    else:  # untraced: prefix re-runs, one more pass per corrected layer
        _per_layer(qmodel, feeds, order, float_means.picks, fix, config)
        passes += len(fix.shifts) - 1
    return {
        "mode": "affine" if affine else "empirical",
        "corrected": fix.shifts,
        **_scaled(fix.scales, affine, layers, order),
        "passes": passes,
        **({} if engine is None else {"engine": engine}),
        **_not_corrected(shared),
        "checked": fix.checks,
        "rejected": fix.rejected,
        "left_out_samples": sum(len(v) for v in drop.values()),
    }


def _float_means(
    qmodel: nn.Module,
    data: Iterable[Any],
    config: PTQConfig,
    options: BiasCorrectionOptions,
    float_means: FloatMeans | None,
    drop: dict[int, set[int]],
) -> tuple[FloatMeans, int]:
    """The float means to correct against and the passes over the data they cost: those tapped
    from the calibration pass (1 pass) when they cover ``options.samples`` samples and
    ``options.rows`` rows and calibration left no sample out, else a float pass of bias
    correction's own (2 passes; over the tap's batches when it holds the right samples)."""
    tapped = float_means is not None and float_means.samples == options.samples
    if not tapped or float_means is None or float_means.rows != options.rows or drop:
        source = float_means.feeds if tapped and float_means is not None else None
        return _float_pass(qmodel, data, config, options, drop, source), 2
    return float_means, 1


def _order(
    qmodel: nn.Module,
    data: Iterable[Any],
    config: PTQConfig,
    float_means: FloatMeans,
    layers: dict[str, QuantLayer],
    off: Collection[str],
    feeds: list[Any],
) -> tuple[list[str], dict[str, Mean], dict[str, int]]:
    """The layers to correct in execution order, their float means (summed over the ranks), and
    the layers left alone because they run more than once per forward (``{layer: calls}``)."""
    if can_propagate(qmodel):  # the order is read off the graph, not the data
        order = layer_order(qmodel, data, config)
    else:  # the order the float pass ran them in; never run: last
        order = float_means.order + [n for n in layers if n not in float_means.order]
    order = [n for n in order if layers[n].quantized and n not in off]  # off: by a scope
    ref = {n: float_means.means[n] for n in order}
    # a layer that runs more than once per forward (a module called twice, tied weights) has one
    # bias for calls with different statistics: a mean over all of them corrects none; left alone
    shared = {n: ref[n].calls // max(len(feeds), 1) for n in order if ref[n].calls > len(feeds)}
    shared = from_data("bias correction: layers called more than once", shared, bool(feeds))
    order = from_data("bias correction: layer order", order, bool(feeds))
    over_ranks("bias correction: float means", ref)
    order = [n for n in order if ref[n].value is not None and n not in shared]
    return order, ref, shared


class _Corrector:
    """Corrects one layer at a time from its quantized output's mean against the float one
    (``ref``), and keeps what it did: the record's ``corrected`` (max ``|E[y] - E[ỹ]|``),
    ``scaled`` (affine: ``[min a, max a]``), ``checked`` and ``rejected``."""

    def __init__(self, layers: dict[str, QuantLayer], ref: dict[str, Mean], affine: bool) -> None:
        self.layers, self.ref, self.affine = layers, ref, affine
        self.shifts: dict[str, float] = {}
        self.scales: dict[str, list[float]] = {}
        self.checks: dict[str, dict[str, Any]] = {}
        self.rejected: dict[str, str] = {}

    def pairs(self, name: str) -> Paired:
        """The (float, quantized) row pairs of layer ``name``: the same answer on every rank."""
        return Paired(out_channels(self.layers[name].layer))

    def __call__(self, name: str, got: Mean, paired: Paired | None) -> Any:
        """Correct layer ``name`` from its quantized output's mean ``got`` (and the pairs),
        if that passes the check (:mod:`ptqkit.correct.check`); returns what it does to the
        layer's output (``_shift``, or ``None``: nothing)."""
        want, have = self.ref[name].value, got.value
        if want is None or have is None:
            raise ModelError(f"bias correction: {name} did not run on the calibration data")
        if paired is not None:
            paired.over_ranks(f"bias correction: {name} (pairs)")
        layer = self.layers[name]
        a = paired.scale() if paired is not None and self.affine and can_scale(layer) else None
        delta = want - have if a is None else want - a * have
        verdict = check(paired, delta, a, f"bias correction: {name} (check)")
        if verdict is not None:
            self.checks[name] = verdict.as_dict()
        if verdict is not None and not verdict.kept:
            self.rejected[name] = _why_rejected(verdict)
            return None
        if a is None:
            _add_to_bias(layer, delta)
            self.shifts[name] = float(delta.abs().max())
            return lambda y: _shift(y, layer.layer, delta)
        rescale(layer, a, delta)
        self.shifts[name] = float((want - have).abs().max())
        self.scales[name] = [float(a.min()), float(a.max())]
        return lambda y: _shift(y, layer.layer, delta, a)


def _propagated(
    qmodel: fx.GraphModule,
    feeds: list[Any],
    order: list[str],
    picks: dict[str, list[Any]],
    fix: _Corrector,
    config: PTQConfig,
    options: BiasCorrectionOptions,
) -> dict[str, Any]:
    """Correct the layers of ``order`` in one quantized pass (:func:`ptqkit.walk.propagate`):
    each layer's mean is taken over all samples' cached outputs, its bias corrected, and its
    corrected outputs fed on. Returns the engine's record (batches and spills summed over ranks)."""
    bar = iter(progress(order, config.progress, "bias correction"))

    def visit(name: str, layer: QuantLayer, inputs: Any, outputs: Any) -> Any:
        next(bar, None)
        got, paired = Mean(), fix.pairs(name)
        record = _recorder(got, paired, picks[name])
        for y in outputs():  # one read of each cached (maybe spilled) output
            record(layer, None, y)
        over_ranks(f"bias correction: {name}", {name: got})
        return fix(name, got, paired)

    with torch.no_grad():
        walked = propagate(qmodel, feeds, visit, order, options.memory_budget)
    next(bar, None)
    counts = {k: walked[k] for k in ("batches", "spilled")}
    walked.update(add_up("bias correction: engine", counts))  # totals over the ranks
    return walked


def _per_layer(
    qmodel: nn.Module,
    feeds: list[Any],
    order: list[str],
    picks: dict[str, list[Any]],
    fix: _Corrector,
    config: PTQConfig,
) -> None:
    """Correct the layers of ``order`` on an untraced model: for each, one pass over ``feeds``
    that stops right after it (a forward hook takes its mean), so ``O(depth²)`` forward work."""
    for n in progress(order, config.progress, "bias correction"):
        got, paired = Mean(), fix.pairs(n)
        layer = fix.layers[n]
        h = layer.register_forward_hook(_recorder(got, paired, picks[n]))
        try:
            with torch.no_grad(), stop_after(layer):
                for i, (args, kwargs) in enumerate(feeds):
                    run_until(qmodel, args, kwargs, i)
        finally:
            h.remove()
        over_ranks(f"bias correction: {n}", {n: got})
        fix(n, got, paired)


def _float_pass(
    qmodel: nn.Module,
    data: Iterable[Any],
    config: PTQConfig,
    options: BiasCorrectionOptions,
    drop: dict[int, set[int]],
    source: list[Any] | None,
) -> FloatMeans:
    """The float means (and rows) of a float pass of bias correction's own, over ``source``
    (the batches the calibration tap recorded) or the first samples of ``data``, without the
    samples ``drop`` (``{batch: samples}``: the outlier samples calibration left out)."""
    means = FloatMeans(qmodel, options.samples, options.rows)
    if empty_shard(data):  # (torch.distributed: a rank with no data only sums)
        return means
    feed = (
        enumerate(source)
        if source is not None
        else ((i, (a, k)) for i, a, k in batches(data, config, qmodel, options.samples))
    )
    with torch.no_grad(), float_mode(qmodel), means:
        for i, batch in feed:
            kept = without_samples(batch, drop.get(i, set()))
            if kept is not None:
                run_model(qmodel, i, *kept)
    return means


def _why_rejected(v: LayerCheck) -> str:
    return (
        f"the correction would raise the layer's error against the float output (trimmed mean "
        f"{v.trimmed_before:.3g} -> {v.trimmed_after:.3g}, mean {v.mean_before:.3g} -> "
        f"{v.mean_after:.3g}, over {v.samples} samples): not written"
    )


def _recorder(got: Mean, paired: Paired | None, picks: list[Any]) -> Any:
    """A forward hook adding each batch's output to ``got`` and, paired with that batch's
    float rows, to ``paired`` (also called directly on the engine's cached outputs)."""
    seen = [0]  # batches run so far: the index of the float rows to pair with

    def hook(m: QuantLayer, _: Any, y: Any) -> None:
        got.add(y, m.layer)
        if paired is not None:
            pair(paired, [y], picks[seen[0] : seen[0] + 1], m.layer)
        seen[0] += 1

    return hook


def _scaled(
    scales: dict[str, list[float]], affine: bool, layers: dict[str, QuantLayer], order: list[str]
) -> dict[str, Any]:
    """The record of the scale fit: per layer ``[min a, max a]``, and the layers that only got
    their bias corrected (a weight scale per tensor, not per output channel)."""
    if not affine:
        return {}
    bias_only = [n for n in order if n not in scales]
    why = "its weight scale is not one per output channel: bias only"
    return {"scaled": scales, "bias_only": {n: why for n in bias_only if not can_scale(layers[n])}}


def _not_corrected(shared: dict[str, int]) -> dict[str, Any]:
    if not shared:
        return {}
    why = "runs {} times per forward: one bias for calls with different statistics"
    return {"not_corrected": {n: why.format(k) for n, k in shared.items()}}


def float_means_tap(qmodel: nn.Module, config: PTQConfig) -> FloatMeans | None:
    """What empirical bias correction takes from the calibration pass (its *tap*): the float
    layers' per-channel output means over the first ``samples`` samples, so that it runs no
    float pass of its own; ``None`` for the other modes."""
    if config.bias_correction not in DATA_MODES:
        return None
    if config.bias_correction == "auto" and not can_propagate(qmodel):
        return None  # it will not run (see correct_bias)
    opts = config.bias_correction_options
    return FloatMeans(qmodel, opts.samples, opts.rows)  # (rows: what each correction is checked on)


def correct_bias(
    qmodel: nn.Module,
    data: Iterable[Any] | None,
    config: PTQConfig,
    info: PTQInfo,
    float_means: FloatMeans | None = None,
) -> nn.Module:
    """Correct the biases of the quantized layers of ``qmodel`` in place (see the module
    docstring); ``config.bias_correction`` picks the variant (``"empirical"`` when it is not
    set; ``"affine"``: the bias and each output channel's scale, :mod:`ptqkit.correct.affine`;
    ``"auto"``: affine on a model :func:`ptqkit.walk.propagate` can run, otherwise nothing,
    with the reason in the record). A layer a scope turns bias correction off for
    (:meth:`PTQConfig.off_layers`) keeps its bias (and weight scale) as they are, and is listed
    in the record's ``off_by_scope``; the layers after it are corrected for what it does.
    Weights must be quantized already. Records ``info.details["bias_correction"]``."""
    mode = config.bias_correction or "empirical"
    if mode == "auto":  # affine where it is one quantized pass
        if not can_propagate(qmodel):
            why = (
                "bias correction ('auto') skipped: the model was not captured as a graph the "
                "one-pass engine can walk, and the per-layer fallback costs one pass per layer; "
                "set bias_correction='affine' to run it anyway"
            )
            info.details["bias_correction"] = {"mode": "auto", "corrected": {}, "skipped": why}
            return qmodel
        mode = "affine"
    if not any(q.quantized for q in quant_layers(qmodel).values()):
        info.warn("bias correction: no layer has quantized weights yet; nothing to correct")
        named = "empirical" if mode is True else str(mode)  # (True: the empirical default)
        info.details["bias_correction"] = {"mode": named, "corrected": {}}
        return qmodel
    off = config.off_layers("bias_correction", quant_layers(qmodel))  # left as they are
    if mode == "analytic":
        details = _analytic(qmodel, info, off)
    else:
        with guard("bias correction"):
            opts = config.bias_correction_options
            details = _empirical(
                qmodel, data, config, info, opts, float_means, affine=mode == "affine", off=off
            )
    if off:
        details["off_by_scope"] = off
    info.details["bias_correction"] = cast(BiasCorrectionRecord, details)  # (the builders' dict)
    return qmodel


__all__ = ["DATA_MODES", "clipped_normal_mean", "correct_bias", "float_means_tap"]
