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
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from ..calibrate.weights import weight_range
from ..config import AdaRoundOptions, PTQConfig
from ..data import Batch
from ..graph import activation_bounds
from ..info import PTQInfo
from ..progress import progress
from ..quant.modules import QuantLayer, quant_layers
from ..quant.primitives import broadcast_along, qparams, storage_dtype
from ..sync import active, add_up, empty_shard, exchange, from_data, from_first, guard
from ..walk import RERUN, Rerun, can_propagate, layer_order, propagate
from .samples import Rows, collect_prefix, float_targets, input_rows

#: the rectified sigmoid's stretch (Louizos et al. 2018, as in the paper)
ZETA, GAMMA = 1.1, -0.1
#: Adam's moment decays
ADAM_B1, ADAM_B2 = 0.9, 0.999


def _activation(qmodel: nn.Module, name: str) -> Any:
    """The clipping activation right after layer ``name`` as a function on ``[rows, C]``."""
    if not isinstance(qmodel, fx.GraphModule):
        return None
    for node in qmodel.graph.nodes:
        if node.op == "call_module" and node.target == name and len(node.users) == 1:
            bounds = activation_bounds(next(iter(node.users)), qmodel)
            if bounds is None:
                return None
            lo, hi = (torch.as_tensor(v, dtype=torch.float32) for v in bounds)
            return lambda t: torch.minimum(torch.maximum(t, lo.to(t.device)), hi.to(t.device))
    return None


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def round_layer(
    layer: QuantLayer,
    scale: torch.Tensor,
    zp: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    act: Any,
    iters: int,
    seed: int,
    options: AdaRoundOptions | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Learn the rounding of ``layer``'s float weight on rows ``x`` → ``target``; returns the
    integer weight and the reconstruction losses (nearest rounding, AdaRound) on those rows.
    Hyperparameters from ``options`` (default :class:`AdaRoundOptions`)."""
    opts = AdaRoundOptions() if options is None else options
    beta_start, beta_end = opts.beta
    spec = layer.spec
    w = layer.weight_fp.float()
    s = broadcast_along(scale.to(w.device), w, spec.axis)
    z = broadcast_along(zp.to(w.device).float(), w, spec.axis)
    floor = torch.floor(w / s)
    rest = (w / s - floor).clamp(0, 1)
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    v = torch.log(p / (1 - p)).requires_grad_(True)
    bias = layer.bias.detach().float() if layer.bias is not None else None
    g = x.shape[1]
    f = act if act is not None else (lambda t: t)
    goal = f(target)

    def forward(wq: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("bgk,gok->bgo", xb, wq.reshape(g, wq.shape[0] // g, -1))
        out = out.reshape(xb.shape[0], -1)
        return f(out + bias if bias is not None else out)

    def soft(h: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(floor + h + z, spec.qmin, spec.qmax) - z) * s

    def loss_of(wq: torch.Tensor) -> float:
        with torch.no_grad():
            return float((forward(wq, x) - goal).pow(2).sum(1).mean())

    nearest = loss_of((torch.clamp(torch.round(w / s) + z, spec.qmin, spec.qmax) - z) * s)
    m1, m2 = torch.zeros_like(v), torch.zeros_like(v)  # Adam moments (written out: the
    # torch.optim step pulls in torch._dynamo, seconds of import for a few lines of arithmetic)
    gen = torch.Generator().manual_seed(seed)
    warm = int(opts.warmup * iters)
    n = x.shape[0]
    for t in range(iters):
        idx = torch.randint(0, n, (min(n, opts.rows_per_step),), generator=gen).to(x.device)
        h = _h(v)
        rec = (forward(soft(h), x[idx]) - goal[idx]).pow(2).sum(1).mean()
        if t >= warm:
            frac = (t - warm) / max(1, iters - warm)
            beta = beta_end + (beta_start - beta_end) * (1 - frac)
            loss = rec + opts.reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
        else:
            loss = rec
        (grad,) = torch.autograd.grad(loss, v)
        with torch.no_grad():
            m1.mul_(ADAM_B1).add_(grad, alpha=1 - ADAM_B1)
            m2.mul_(ADAM_B2).addcmul_(grad, grad, value=1 - ADAM_B2)
            step = opts.lr / (1 - ADAM_B1 ** (t + 1))
            denom = (m2 / (1 - ADAM_B2 ** (t + 1))).sqrt_().add_(1e-8)
            v.addcdiv_(m1, denom, value=-step)
    up = (v.detach() >= 0).float()
    q = torch.clamp(floor + up + z, spec.qmin, spec.qmax)
    learned = loss_of((q - z) * s)
    return q.to(storage_dtype(spec)), {"nearest": nearest, "adaround": learned}


def adaround(qmodel: nn.Module, data: Iterable[Any], config: PTQConfig, info: PTQInfo) -> nn.Module:
    """Quantize the weights of every :class:`QuantLayer` of ``qmodel`` with AdaRound (see the
    module docstring), layer by layer on ``data``; records ``info.details["adaround"]``
    (reconstruction loss with nearest rounding and with AdaRound, per layer, on the sampled rows).

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
    opts = config.adaround_options
    empty = empty_shard(data)  # this rank has no data (torch.distributed): it only follows
    traced = can_propagate(qmodel)  # the order is read off the graph, not the data
    order = list(layers) if empty and not traced else layer_order(qmodel, data, config)
    if active() and not can_propagate(qmodel):  # untraced: the order of a rank that ran
        order = from_data("adaround: layer order", order, not empty)
    seeds = {n: config.seed + k for k, n in enumerate(order) if layers[n].weight_fp.numel() > 0}
    report: dict[str, Any] = {}

    def learn(name: str, rows: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        layer = layers[name]
        dev = layer.weight_fp.device
        everyone = exchange(f"adaround: {name} rows", rows) if active() else [rows]
        shared = [r for r in everyone if r is not None]
        if not shared:  # no rank has rows: nearest rounding, below
            return

        def solve() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
            x, y = (torch.cat([r[k].to(dev) for r in shared]) for k in (0, 1))
            lo, hi = weight_range(layer, config.weight_calibration)
            scale, zp = qparams(lo, hi, layer.spec)
            act = _activation(qmodel, name)
            with torch.enable_grad():
                q, losses = round_layer(
                    layer, scale, zp, x, y, act, config.adaround_iters, seeds[name], opts
                )
            return q, scale, zp, {**losses, "rows": int(x.shape[0])}

        q, scale, zp, record = from_first(f"adaround: {name}", solve)
        layer.set_quantized(q.to(dev), scale.to(dev), zp.to(dev))
        report[name] = record

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
        bar = iter(progress(used, config.progress, "adaround"))

        def visit(name: str, layer: QuantLayer, inputs: Any, outputs: Any) -> Rerun:
            next(bar, None)
            plan = plans[name]
            learn(name, (input_rows(layer, plan, inputs), plan.target()) if plan.picks else None)
            return RERUN

        with torch.no_grad():
            walked = propagate(qmodel, feeds, visit, used, opts.memory_budget)
        counts = {k: walked[k] for k in ("batches", "spilled")}
        engine = {"cached_inputs": True, **walked, **add_up("adaround: engine", counts)}
        next(bar, None)
    else:
        del plans, feeds  # the untraced path collects per layer
        for name in progress(used, config.progress, "adaround"):
            layer = layers[name]
            rows = None if empty else collect_prefix(qmodel, layer, data, config, seeds[name])
            learn(name, rows)
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
    }
    return qmodel


__all__ = ["adaround", "round_layer"]
