"""Adaptive rounding of the weights (AdaRound, Nagel et al. 2020, "Up or Down? Adaptive Rounding
for Post-Training Quantization").

Rounding each weight to the nearest grid point minimizes the error of the weights, not of the
layer's output. AdaRound learns, per weight, whether to round down or up:

    W̃ = s · (clamp(⌊W/s⌋ + h(V) + z, qmin, qmax) - z),   h(V) = clamp(σ(V)·(ζ - γ) + γ, 0, 1)

(the rectified sigmoid, ``ζ = 1.1``, ``γ = -0.1``), with ``V`` initialized so that ``h(V)`` is the
fractional part of ``W/s`` (``W̃ = W`` inside the grid) and optimized with Adam on

    ‖f(W x + b) - f(W̃ x̂ + b)‖² (summed over channels, mean over rows)
        + λ · Σ (1 - |2·h(V) - 1|^β)

where ``x`` is the layer's input in the float network, ``x̂`` its input in the partially
quantized network (earlier layers already rounded, activations quantized: the "asymmetric"
reconstruction of the paper), and ``f`` the clipping activation that follows the layer (ReLU,
ReLU6, ...; identity otherwise). The regularizer, off for the first ``warmup`` fraction of the
iterations (20 %), pushes ``h`` to 0 or 1 while ``β`` anneals from ``beta[0]`` to ``beta[1]``
(20 → 2); at the end ``h`` is rounded (``V ≥ 0`` → up). The scale ``s`` (and ``z``) come from
``config.weight_calibration`` as for nearest rounding. ``λ = reg = 0.01``. The hyperparameters
are ``config.adaround_options`` (:class:`ptqkit.config.AdaRoundOptions`); every random draw
uses a ``torch.Generator`` seeded from ``config.seed`` (the global RNG is neither read nor
written).

Layers are processed one at a time in execution order, on sampled rows
(:mod:`ptqkit.correct.samples`: at most ``rows_per_batch`` output positions per batch, up to
``max_rows`` per layer). Forward work is ``O(depth)``: one float pass records every layer's
target rows, then one pass of the partially quantized network runs the traced graph node by node
over the cached batches (:func:`ptqkit.walk.propagate`), rounding each layer right before it
runs, so that the layers after it see its rounded weights. A model that could not be traced
runs the prefix up to each layer twice per batch instead (``O(depth²)``).

Per-layer optimization (the cost that remains; same algorithm, cheaper steps):

* gradients written out (:mod:`ptqkit.correct.rounding`) instead of autograd: the graph
  bookkeeping of ~30 small tensor operations per step dominated the small layers of CNNs;
* a layer with no activation after it (``f`` = identity: a linear bottleneck, a conv before a
  residual add, the classifier) optimizes the same loss through its Gram matrix over *all* its
  rows (:class:`ptqkit.correct.recon.GramObjective`): an exact full-batch gradient per step, for
  ``O·k²`` instead of ``2·B·k·O``;
* mini-batches are slices of the rows shuffled once, visited in a new random order each epoch
  (each row once per epoch, no per-step gather, instead of rows drawn with replacement); a
  depthwise layer (9 weights per channel) steps on ``depthwise_rows_per_step`` (256) rows instead
  of ``rows_per_step`` (1,024);
* the steps of a layer with fewer than ``SMALL_STEP`` multiply-adds per step (the Gram-matrix
  steps of small layers) run on one thread (see :data:`SMALL_STEP`; the thread count is restored
  after); larger ones use the caller's threads;
* early stop (``AdaRoundOptions.early_stop``, on by default): once the regularizer is on and
  every ``h`` is exactly 0 or 1, both gradients are zero and the rounding is decided; the
  layer's optimization ends there (``steps`` in the report).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from ..calibrate.weights import weight_range
from ..config import AdaRoundOptions, PTQConfig
from ..data import Batch, model_device
from ..graph import activation_after
from ..info import PTQInfo
from ..progress import progress
from ..quant.modules import QuantLayer, quant_layers
from ..quant.primitives import qparams
from ..sync import active, add_up, empty_shard, exchange, from_data, from_first, guard
from ..walk import RERUN, Rerun, can_propagate, layer_order, propagate
from .cost import adaround_seconds, layer_work, probe
from .recon import Bounds, RowObjective, objective
from .rounding import SoftRounding, adam_step, beta_at, settled
from .samples import Rows, collect_prefix, float_targets, input_rows
from .threads import threads

logger = logging.getLogger("ptqkit.adaround")

#: multiply-adds per step below which a layer's optimization runs on one thread
#: (:func:`ptqkit.correct.threads.threads`). A layer's step is ~40 tensor operations of
#: ~10³-10⁶ elements: with several threads each parallel one waits for every thread. On an
#: otherwise idle 2-core machine, two threads are faster for every row-based step of
#: MobileNetV2-style (W4A8, 500 steps/layer: 24.3 s of optimization on one thread, 16.5 s with
#: the Gram steps of fewer than ``2¹⁸`` multiply-adds on one thread and the others on two); on a
#: loaded machine they can be far slower (a 16→32 3×3 conv, 8,192 rows, 200 steps, under load:
#: 0.57 s on one thread, 8.2 s on two), which is why the test suite runs single-threaded. The
#: choice depends on the layer's size only, so the result does not depend on the load. Layers
#: with at least this many multiply-adds per step keep the caller's threads.
SMALL_STEP = 1 << 18


def round_layer(
    layer: QuantLayer,
    scale: torch.Tensor,
    zp: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    act: tuple[Any, Any] | None,
    iters: int,
    seed: int,
    options: AdaRoundOptions | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Learn the rounding of ``layer``'s float weight on rows ``x [n, groups, k]`` → ``target
    [n, O]`` (``act``: the bounds of the clipping activation after the layer, or ``None``);
    returns the integer weight and the reconstruction losses (nearest rounding, AdaRound) on
    those rows, and the steps run; where the learned hard rounding's loss exceeds nearest
    rounding's on those rows, the nearest rounding is returned (``"kept": "nearest"``).
    Hyperparameters from ``options`` (default
    :class:`AdaRoundOptions`)."""
    opts = AdaRoundOptions() if options is None else options
    dev = layer.weight_fp.device
    x, target = x.detach().float(), target.detach().float()
    bounds: Bounds = None
    if act is not None:
        lo, hi = (torch.as_tensor(v, dtype=torch.float32, device=dev) for v in act)
        bounds = (lo, hi)
    bias = layer.bias.detach().float() if layer.bias is not None else None
    g = x.shape[1]
    r = SoftRounding(layer, scale, zp)
    depthwise = g > 1 and g == target.shape[1]  # one output channel per group
    per_step = opts.depthwise_rows_per_step if depthwise else opts.rows_per_step
    goal = objective(x, target, bias, bounds, g, per_step, seed)
    # the losses reported, on all the rows
    n = x.shape[0]
    exact = (
        goal if isinstance(goal, RowObjective) else RowObjective(x, target, bias, bounds, g, n, 0)
    )
    nearest = exact.loss(r.dequant(r.nearest_q))
    steps = iters
    with threads(1 if goal.step_macs < SMALL_STEP else None):
        for t in range(iters):
            if settled(t, iters, opts, [r]):
                steps = t
                break
            beta = beta_at(t, iters, opts)
            adam_step(r, r.grad(goal.grad(r.soft()), opts.reg, beta), opts.lr)
    q = r.hard()
    learned = exact.loss(r.dequant(q))
    if learned > nearest:  # the hard rounding lost on its own objective: keep nearest's, say so
        near = r.nearest_q.to(q.dtype)
        return near, {"nearest": nearest, "adaround": learned, "steps": steps, "kept": "nearest"}
    return q, {"nearest": nearest, "adaround": learned, "steps": steps}


def _announce(qmodel: nn.Module, config: PTQConfig) -> None:
    """Log what the optimization is expected to cost (:mod:`ptqkit.correct.cost`): its time
    grows with the weights × steps × rows, minutes on a large model on a few CPU cores."""
    if not logger.isEnabledFor(logging.INFO):
        return
    work = layer_work(qmodel)
    expected = adaround_seconds(work, config, probe(model_device(qmodel)))
    took = (
        f"{expected:.2g} s"
        if expected < 10
        else (f"{expected:.0f} s" if expected < 600 else f"{expected / 60:.0f} min")
    )
    logger.info(
        "adaround: %d layers, %s weights, %d steps each: about %s of optimization expected on "
        "this machine (fewer adaround_iters or rows_per_step cost less)",
        len(work),
        f"{sum(w.weights for w in work):,}",
        config.adaround_iters,
        took,
    )


def adaround(qmodel: nn.Module, data: Iterable[Any], config: PTQConfig, info: PTQInfo) -> nn.Module:
    """Quantize the weights of every :class:`QuantLayer` of ``qmodel`` with AdaRound (see the
    module docstring), layer by layer on ``data``; records ``info.details["adaround"]``
    (reconstruction loss with nearest rounding and with AdaRound, per layer, on the sampled rows).
    A layer a scope turns AdaRound off for (:meth:`PTQConfig.off_layers`) is rounded to nearest
    (the integers ``weight_calibration`` alone gives) and recorded as ``off_by_scope``.

    Under ``torch.distributed``, each rank samples rows from its own shard; for each layer, the
    rows of all ranks (in rank order) go to rank 0, which learns the rounding and sends it to
    every rank before the next layer runs: every rank ends with the same integer weights.
    """
    with guard("adaround"):
        return _adaround(qmodel, data, config, info)


def _adaround(
    qmodel: nn.Module, data: Iterable[Any], config: PTQConfig, info: PTQInfo
) -> nn.Module:
    layers = quant_layers(qmodel)
    if not layers:
        info.warn("AdaRound: the model has no layer with weights to round; nothing was done")
        info.details["adaround"] = {"layers": {}}
        return qmodel
    if config.adaround_options.granularity == "block" and _blocks(qmodel, data, config, info):
        return qmodel
    _announce(qmodel, config)
    empty = empty_shard(data)  # this rank has no data (torch.distributed): it only follows
    order = _order(qmodel, data, config, layers, empty)
    off = config.off_layers("adaround", layers)  # a scope's: nearest rounding, before any other
    for name in off:  # (the layers after one see its rounded weights, as they would in order)
        layers[name].set_weight_range(*weight_range(layers[name], config.weight_calibration))
    seeds = {
        n: config.seed + k
        for k, n in enumerate(order)  # (the others' seeds as without the scope)
        if layers[n].weight_fp.numel() > 0 and n not in off
    }
    learn = _Learner(qmodel, layers, config, seeds)
    engine: dict[str, Any] = {"cached_inputs": False}
    plans: dict[str, Rows]
    feeds: list[Batch]
    if empty:
        plans, feeds = {n: Rows(s) for n, s in seeds.items()}, []
    else:
        plans, feeds = float_targets(qmodel, data, config, seeds, layers)
    picked = add_up("adaround: layers with rows", {n: int(bool(p.picks)) for n, p in plans.items()})
    used = [n for n in order if picked.get(n)]  # on any rank
    if can_propagate(qmodel, used):
        engine = _propagated(qmodel, learn, used, plans, feeds)
    else:
        del plans, feeds  # the untraced path collects per layer
        for name in progress(used, config.progress, "adaround"):
            layer = layers[name]
            rows = None if empty else collect_prefix(qmodel, layer, data, config, seeds[name])
            learn(name, rows)
    report = learn.report
    report.update({n: {"off_by_scope": label} for n, label in off.items()})
    for name in order:
        if name not in report:
            layers[name].set_weight_range(*weight_range(layers[name], config.weight_calibration))
            report[name] = {"skipped": "no calibration data reached it: nearest rounding"}
            info.warn(f"AdaRound: {name} never ran on the calibration data; rounded to nearest")
    info.details["adaround"] = {
        "layers": {n: report[n] for n in order},
        "iters": config.adaround_iters,
        "weight_calibration": config.weight_calibration,
        "engine": engine,
        **({"off_by_scope": off} if off else {}),
    }
    return qmodel


def _blocks(qmodel: nn.Module, data: Iterable[Any], config: PTQConfig, info: PTQInfo) -> bool:
    """``granularity="block"``: whether block reconstruction (:mod:`ptqkit.correct.brecq`) did
    the rounding; when it cannot, a warning says why and AdaRound goes layer by layer."""
    why = "runs on one process only (torch.distributed is active)" if active() else None
    if why is None:
        from .brecq import reconstruct_blocks

        why = reconstruct_blocks(qmodel, data, config, info)
        if why is None:
            return True
    info.warn(f"Block reconstruction not possible: {why}; AdaRound rounds layer by layer")
    return False


def _order(
    qmodel: nn.Module,
    data: Iterable[Any],
    config: PTQConfig,
    layers: dict[str, QuantLayer],
    empty: bool,
) -> list[str]:
    """The layers in execution order: read off the traced graph, else off the data (under
    ``torch.distributed``, an untraced model takes the order of a rank that ran)."""
    traced = can_propagate(qmodel)  # the order is read off the graph, not the data
    order = list(layers) if empty and not traced else layer_order(qmodel, data, config)
    if active() and not can_propagate(qmodel):  # untraced: the order of a rank that ran
        order = from_data("adaround: layer order", order, not empty)
    return order


class _Learner:
    """``learner(name, rows)``: learn the rounding of layer ``name`` from its sampled ``(x, y)``
    rows (all ranks' rows, solved on rank 0 and sent to every rank) and set its integer
    weights; ``report`` holds each learned layer's record."""

    def __init__(
        self,
        qmodel: nn.Module,
        layers: dict[str, QuantLayer],
        config: PTQConfig,
        seeds: dict[str, int],
    ) -> None:
        self.qmodel, self.layers, self.config, self.seeds = qmodel, layers, config, seeds
        self.report: dict[str, Any] = {}

    def __call__(self, name: str, rows: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        layer = self.layers[name]
        dev = layer.weight_fp.device
        everyone = exchange(f"adaround: {name} rows", rows) if active() else [rows]
        shared = [r for r in everyone if r is not None]
        if not shared:  # no rank has rows: nearest rounding, in _adaround
            return
        q, scale, zp, record = from_first(f"adaround: {name}", lambda: self._solve(name, shared))
        layer.set_quantized(q.to(dev), scale.to(dev), zp.to(dev))
        self.report[name] = record

    def _solve(
        self, name: str, shared: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        layer, config = self.layers[name], self.config
        dev = layer.weight_fp.device
        x, y = (torch.cat([r[k].to(dev) for r in shared]) for k in (0, 1))
        lo, hi = weight_range(layer, config.weight_calibration)
        scale, zp = qparams(lo, hi, layer.spec)
        act = activation_after(self.qmodel, name)
        q, losses = round_layer(
            layer,
            scale,
            zp,
            x,
            y,
            act,
            config.adaround_iters,
            self.seeds[name],
            config.adaround_options,
        )
        return q, scale, zp, {**losses, "rows": int(x.shape[0])}


def _propagated(
    graph: fx.GraphModule,
    learn: _Learner,
    used: list[str],
    plans: dict[str, Rows],
    feeds: list[Batch],
) -> dict[str, Any]:
    """The traced path: one pass of the partially quantized network over the cached batches,
    each layer rounded right before it runs (:func:`ptqkit.walk.propagate`); returns the
    engine's record."""
    config = learn.config
    bar = iter(progress(used, config.progress, "adaround"))

    def visit(name: str, layer: QuantLayer, inputs: Any, outputs: Any) -> Rerun:
        next(bar, None)
        plan = plans[name]
        learn(name, (input_rows(layer, plan, inputs), plan.target()) if plan.picks else None)
        return RERUN

    with torch.no_grad():
        walked = propagate(graph, feeds, visit, used, config.adaround_options.memory_budget)
    counts = {k: walked[k] for k in ("batches", "spilled")}
    engine = {"cached_inputs": True, **walked, **add_up("adaround: engine", counts)}
    next(bar, None)
    return engine


__all__ = ["adaround", "round_layer"]
