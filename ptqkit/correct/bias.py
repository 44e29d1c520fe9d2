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

import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..config import BiasCorrectionOptions, PTQConfig
from ..data import channels_last, run_model
from ..errors import DataError, ModelError
from ..graph import activation_bounds, input_channel_view, is_flatten_1
from ..info import PTQInfo
from ..progress import progress
from ..quant.modules import ActQuant, QuantLayer, float_mode, out_channels, quant_layers
from ..sync import add_up, empty_shard, from_data, guard
from ..typed import submodule, target_name
from ..walk import batches, can_propagate, layer_order, propagate, run_until, stop_after
from .affine import Paired, bias_q, can_scale, pair, rescale
from .means import FloatMeans, Mean, over_ranks

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


def _add_to_bias(layer: QuantLayer, delta: torch.Tensor) -> None:
    """``bias_q ← bias_q + delta`` (:func:`ptqkit.correct.affine.bias_q`)."""
    delta = delta.to(layer.weight_fp.device, torch.float32)
    old = bias_q(layer)  # summed in float32, kept in the layer's dtype (half...)
    layer.bias_q = (old.float() + delta).to(old.dtype)
    layer.select_bias("bias_q" if layer.quantized else "bias_fp")


# -- empirical ---------------------------------------------------------------------------------
def _empirical(
    qmodel: nn.Module,
    data: Iterable[Any] | None,
    config: PTQConfig,
    info: PTQInfo,
    options: BiasCorrectionOptions,
    float_means: FloatMeans | None = None,
    affine: bool = False,
) -> dict[str, Any]:
    if data is None:
        raise DataError(
            "empirical bias correction needs calibration data; pass data, or use "
            "bias_correction='analytic' (data-free, from BatchNorm statistics)"
        )
    layers = quant_layers(qmodel)
    passes = 1  # the float means were tapped from the calibration pass
    rows = options.rows if affine else 0
    if (
        float_means is None
        or float_means.samples != options.samples
        or (affine and float_means.rows != rows)
    ):  # a float pass of its own
        float_means, passes = FloatMeans(qmodel, options.samples, rows), 2
        if not empty_shard(data):  # (torch.distributed: a rank with no data only sums)
            with torch.no_grad(), float_mode(qmodel), float_means:
                for i, args, kwargs in batches(data, config, qmodel, options.samples):
                    run_model(qmodel, i, args, kwargs)
    feeds = [channels_last(*b) for b in float_means.feeds]  # (faster convs, same statistics)
    if can_propagate(qmodel):  # the order is read off the graph, not the data
        order = layer_order(qmodel, data, config)
    else:  # the order the float pass ran them in; never run: last
        order = float_means.order + [n for n in layers if n not in float_means.order]
    order = [n for n in order if layers[n].quantized]
    ref = {n: float_means.means[n] for n in order}
    # a layer that runs more than once per forward (a module called twice, tied weights) has one
    # bias for calls with different statistics: a mean over all of them corrects none; left alone
    shared = {n: ref[n].calls // max(len(feeds), 1) for n in order if ref[n].calls > len(feeds)}
    shared = from_data("bias correction: layers called more than once", shared, bool(feeds))
    order = from_data("bias correction: layer order", order, bool(feeds))
    over_ranks("bias correction: float means", ref)
    order = [n for n in order if ref[n].value is not None and n not in shared]
    shifts: dict[str, float] = {}
    scales: dict[str, list[float]] = {}
    picks = float_means.picks

    def correct(name: str, got: Mean, paired: Paired | None) -> Any:
        """Correct layer ``name`` from its quantized output's mean ``got`` (and the pairs);
        returns what it does to the layer's output (``_shift``)."""
        want, have = ref[name].value, got.value
        if want is None or have is None:
            raise ModelError(f"bias correction: {name} did not run on the calibration data")
        if paired is not None:
            paired.over_ranks(f"bias correction: {name} (pairs)")
        a = None if paired is None else paired.scale()
        layer = layers[name]
        if a is None:
            delta = want - have
            _add_to_bias(layer, delta)
            shifts[name] = float(delta.abs().max())
            return lambda y: _shift(y, layer.layer, delta)
        delta = want - a * have
        rescale(layer, a, delta)
        shifts[name] = float((want - have).abs().max())
        scales[name] = [float(a.min()), float(a.max())]
        return lambda y: _shift(y, layer.layer, delta, a)

    def pairs(name: str) -> Paired | None:  # the same answer on every rank
        ok = affine and can_scale(layers[name])
        return Paired(out_channels(layers[name].layer)) if ok else None

    if can_propagate(qmodel, order):
        bar = iter(progress(order, config.progress, "bias correction"))

        def visit(name: str, layer: QuantLayer, inputs: Any, outputs: Any) -> Any:
            next(bar, None)
            got, paired = Mean(), pairs(name)
            record = _recorder(got, paired, picks[name])
            for y in outputs():  # one read of each cached (maybe spilled) output
                record(layer, None, y)
            over_ranks(f"bias correction: {name}", {name: got})
            return correct(name, got, paired)

        with torch.no_grad():
            walked = propagate(qmodel, feeds, visit, order, options.memory_budget)
        next(bar, None)
        counts = {k: walked[k] for k in ("batches", "spilled")}
        walked.update(add_up("bias correction: engine", counts))  # totals over the ranks
        return {
            "mode": "affine" if affine else "empirical",
            "corrected": shifts,
            **_scaled(scales, affine, layers, order),
            "passes": passes,
            "engine": walked,
            **_not_corrected(shared),
        }
    for n in progress(order, config.progress, "bias correction"):  # untraced: prefix re-runs
        got, paired = Mean(), pairs(n)
        layer = layers[n]
        h = layer.register_forward_hook(_recorder(got, paired, picks[n]))
        try:
            with torch.no_grad(), stop_after(layer):
                for i, (args, kwargs) in enumerate(feeds):
                    run_until(qmodel, args, kwargs, i)
        finally:
            h.remove()
        over_ranks(f"bias correction: {n}", {n: got})
        correct(n, got, paired)
    return {
        "mode": "affine" if affine else "empirical",
        "corrected": shifts,
        **_scaled(scales, affine, layers, order),
        "passes": len(shifts) + passes - 1,
        **_not_corrected(shared),
    }


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


# -- analytic ----------------------------------------------------------------------------------
def clipped_normal_mean(
    mu: torch.Tensor, sigma: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> torch.Tensor:
    """``E[clamp(X, lo, hi)]`` for ``X ~ N(mu, sigma²)``, per channel (``±inf`` bounds allowed)."""
    mu, sigma = mu.double(), sigma.double()
    lo, hi = torch.broadcast_to(lo.double(), mu.shape), torch.broadcast_to(hi.double(), mu.shape)
    normal = torch.distributions.Normal(0.0, 1.0)
    safe = sigma.clamp_min(1e-12)
    a, b = (lo - mu) / safe, (hi - mu) / safe
    cdf_a, cdf_b = normal.cdf(a), normal.cdf(b)
    pdf = lambda t: torch.where(torch.isfinite(t), normal.log_prob(t).exp(), 0.0)  # noqa: E731
    term_lo = torch.where(torch.isfinite(lo), lo * cdf_a, 0.0)
    term_hi = torch.where(torch.isfinite(hi), hi * (1 - cdf_b), 0.0)
    e = term_lo + term_hi + mu * (cdf_b - cdf_a) + sigma * (pdf(a) - pdf(b))
    return torch.where(sigma > 1e-12, e, torch.minimum(torch.maximum(mu, lo), hi))


_PASS = (ActQuant, nn.Identity, nn.Dropout)
_MEAN_PASS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten)


def _input_means(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Expected input per channel of every :class:`QuantLayer` where BatchNorm statistics
    allow it (see the module docstring), and why the others have none."""
    env: dict[fx.Node, tuple[torch.Tensor, torch.Tensor | None] | None] = {}
    means, why = {}, {}
    for node in gm.graph.nodes:
        val: tuple[torch.Tensor, torch.Tensor | None] | None = None
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        inp = env.get(src) if src is not None else None
        mod = submodule(gm, node) if node.op == "call_module" else None
        if isinstance(mod, QuantLayer):
            if inp is not None:
                means[target_name(node)] = inp[0]
            else:
                why[target_name(node)] = "its input has no BatchNorm statistics upstream"
            m, s = getattr(mod.layer, "bn_mean", None), getattr(mod.layer, "bn_std", None)
            if isinstance(m, torch.Tensor) and isinstance(s, torch.Tensor):
                val = (m.double(), s.double())
        elif isinstance(mod, _PASS) or (node.op == "call_function" and node.target is F.dropout):
            val = inp
        elif isinstance(mod, _MEAN_PASS) or is_flatten_1(node, gm):
            val = None if inp is None else (inp[0], None)
        elif node.op in ("call_function", "call_method") and node.target in (
            operator.add,
            torch.add,
            "add",
        ):
            vals = [
                v for a in node.args[:2] if isinstance(a, fx.Node) and (v := env.get(a)) is not None
            ]
            if len(vals) == 2:  # both inputs have statistics
                (m1, s1), (m2, s2) = vals
                std = None if s1 is None or s2 is None else torch.sqrt(s1**2 + s2**2)
                val = (m1 + m2, std)
        elif node.op != "placeholder" and inp is not None and inp[1] is not None:
            bounds = activation_bounds(node, gm)
            if bounds is not None:
                lo, hi = (torch.as_tensor(v, dtype=torch.float64) for v in bounds)
                val = (clipped_normal_mean(inp[0], inp[1], lo, hi), None)
        env[node] = val
    return means, why


def _analytic(qmodel: nn.Module, info: PTQInfo) -> dict[str, Any]:
    if not isinstance(qmodel, fx.GraphModule):
        raise ModelError(
            "analytic bias correction propagates BatchNorm statistics through the graph, but the "
            "model could not be traced; use bias_correction='empirical' with calibration data"
        )
    layers = quant_layers(qmodel)
    if not any(
        isinstance(getattr(q.layer, "bn_mean", None), torch.Tensor) for q in layers.values()
    ):
        raise ModelError(
            "analytic (data-free) bias correction needs BatchNorm statistics, and this model has "
            "no BatchNorm folded into its layers (no BatchNorm, or fold_bn=False); use "
            "bias_correction='empirical' with calibration data"
        )
    means, why = _input_means(qmodel)
    shifts = {}
    for name, mu in means.items():
        q = layers[name]
        if not q.quantized:
            continue
        eps = (q.weight.double() - q.weight_fp.double()).cpu()
        view = input_channel_view(q.layer, eps, mu.numel())
        if view is None:
            why[name] = "its input channels do not match the statistics"
            continue
        g, _, cpg, _ = view.shape
        delta = (view * mu.reshape(g, 1, cpg, 1)).sum(dim=(2, 3)).reshape(-1)
        _add_to_bias(q, -delta)
        shifts[name] = float(delta.abs().max())
    if not shifts:
        info.warn(
            "analytic bias correction found no layer whose input statistics follow from "
            "BatchNorm statistics; nothing was corrected"
        )
    return {"mode": "analytic", "corrected": shifts, "not_corrected": why}


def float_means_tap(qmodel: nn.Module, config: PTQConfig) -> FloatMeans | None:
    """What empirical bias correction takes from the calibration pass (its *tap*): the float
    layers' per-channel output means over the first ``samples`` samples, so that it runs no
    float pass of its own; ``None`` for the other modes."""
    if config.bias_correction not in DATA_MODES:
        return None
    if config.bias_correction == "auto" and not can_propagate(qmodel):
        return None  # it will not run (see correct_bias)
    opts = config.bias_correction_options
    rows = opts.rows if config.bias_correction in ("affine", "auto") else 0
    return FloatMeans(qmodel, opts.samples, rows)


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
    with the reason in the record). Weights must be quantized already. Records
    ``info.details["bias_correction"]``."""
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
        info.details["bias_correction"] = {"mode": mode, "corrected": {}}
        return qmodel
    if mode == "analytic":
        details = _analytic(qmodel, info)
    else:
        with guard("bias correction"):
            opts = config.bias_correction_options
            details = _empirical(
                qmodel, data, config, info, opts, float_means, affine=mode == "affine"
            )
    info.details["bias_correction"] = details
    return qmodel


__all__ = ["DATA_MODES", "clipped_normal_mean", "correct_bias", "float_means_tap"]
