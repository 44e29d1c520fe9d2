"""SmoothQuant (Xiao et al. 2022): move activation outliers into the weights of the Linear that
consumes them, before calibration.

For a Linear ``y = X·Wᵀ + b`` with input channels ``j`` and strength ``α ∈ [0, 1]``:

    ``s_j = max|X_j|^α / max|W_{:,j}|^(1-α)``,  ``X' = X / s``,  ``W' = W · s`` (column ``j``)

so ``X'·W'ᵀ = X·Wᵀ`` (the FP32 function is unchanged) while the per-tensor activation range
shrinks to the channels' common level. ``s_j = 1`` where ``max|X_j|`` or ``max|W_{:,j}|`` is 0;
``s`` is clamped to ``[1e-5, 1e5]``.

**Which Linears**: those whose input is a normalization's output (``LayerNorm``/``RMSNorm``), as
in the paper: in a transformer, q/k/v and the first MLP layer. Their outliers sit in a few
fixed channels and migrate well; the others (e.g. the second MLP layer, reading a GELU output)
measured worse when smoothed (bench/TRANSFORMER.md). The link is seen in the graph, or without
one (untraceable models) by tensor identity during the statistics pass.

**Where ``1/s`` goes**:

* **folded** into the normalization's affine parameters (``γ' = γ/s``, ``β' = β/s``) when the
  model was traced and the normalization's output feeds only the Linears being smoothed
  (pre-LN transformers). The Linears reading that tensor then share one ``s``, computed from
  the largest ``max|W_{:,j}|`` among them;
* otherwise **explicit**: the layer's input quantizer becomes a :class:`SmoothedActQuant`, which
  multiplies by ``1/s`` before quantizing (a ``Mul`` before the Q/DQ pair in an exported graph),
  each Linear with its own ``s``. This is the case of post-LN BERT models (the LayerNorm output
  also feeds the residual add, which must keep the unscaled tensor) and of every model that
  ``torch.fx`` cannot trace (no graph: the other consumers of a tensor are unknown).

``max|X_j|`` needs **one extra pass over the calibration data** (hooks on the Linears and the
normalizations; ``num_batches`` batches; one running max per channel, all-reduced across ranks
under ``torch.distributed``). The first batch is run again after smoothing to check that the
FP32 output did not change (``info.details["smoothquant"]["fp32_max_rel_change"]``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..calibrate import distributed
from ..config import PTQConfig, QuantSpec
from ..data import iter_batches, model_device, run_model, to_device
from ..errors import ConfigError, ModelError
from ..info import PTQInfo
from ..progress import progress
from ..quant.modules import ActQuant, QuantLayer, act_quants, quant_layers
from ..records import SmoothQuantRecord
from ..sync import active
from ..typed import input_node, optional_tensor_attr, submodule, target_name, tensor_attr

MIN_SCALE, MAX_SCALE = 1e-5, 1e5
#: relative change of the FP32 output above which smoothing is reported as not exact
TOLERANCE = 1e-3


class SmoothedActQuant(ActQuant):
    """An input quantizer that first divides by the SmoothQuant scale: ``q(x · (1/s))``.

    The multiplication applies in every mode, ``"off"`` included: it is part of the float
    function (the layer's weight holds ``W·s``). ``inv_scale`` broadcasts along the last axis.
    """

    inv_scale: torch.Tensor

    def __init__(self, spec: QuantSpec, label: str, inv_scale: torch.Tensor) -> None:
        super().__init__(spec, label)
        self.register_buffer("inv_scale", inv_scale.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.inv_scale.to(x.dtype))


def smoothing_scale(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max|W_j|^(1-α)`` (float64 math), 1 where either max is 0."""
    x, w = x_absmax.double(), w_absmax.double().to(x_absmax.device)
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where((x > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(MIN_SCALE, MAX_SCALE).float()


#: normalizations whose output selects a Linear for smoothing, and that can absorb ``1/s``
NORMS = (nn.LayerNorm, nn.RMSNorm)
NORM_FUNCTIONS = {F.layer_norm, torch.layer_norm}


def _is_quant_node(node: Any, gm: fx.GraphModule) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and isinstance(submodule(gm, node), ActQuant)
        and bool(node.args)
    )


def candidates(model: nn.Module) -> dict[str, QuantLayer]:
    """Quantized ``nn.Linear`` layers with an input quantizer right before them."""
    linears = {n: m for n, m in quant_layers(model).items() if isinstance(m.layer, nn.Linear)}
    if not isinstance(model, fx.GraphModule):
        return {n: m for n, m in linears.items() if m.input_quant is not None}
    return {
        node.target: linears[node.target]
        for node in model.graph.nodes
        if node.op == "call_module"
        and node.target in linears
        and node.args
        and _is_quant_node(node.args[0], model)
    }


def _norm_fed_in_graph(gm: fx.GraphModule, names: set[str]) -> set[str]:
    """Layers whose input quantizer reads the output of a normalization (module or function)."""
    fed = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in names and _is_quant_node(node.args[0], gm):
            src = node.args[0].args[0]
            if isinstance(src, fx.Node) and (
                (src.op == "call_module" and isinstance(submodule(gm, src), NORMS))
                or (src.op == "call_function" and src.target in NORM_FUNCTIONS)
            ):
                fed.add(node.target)
    return fed


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _rel_change(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    worst = 0.0
    for a, b in zip(before, after):
        if torch.is_floating_point(a) and a.numel():
            scale = a.detach().abs().max().clamp_min(1e-12)
            worst = max(worst, float((a.detach() - b.detach()).abs().max() / scale))
    return worst


def collect_stats(
    model: nn.Module,
    layers: dict[str, QuantLayer],
    data: Iterable[Any],
    config: PTQConfig,
) -> tuple[dict[str, torch.Tensor], set[str], int, tuple | None]:
    """One pass over ``data``. Returns ``max|X_j|`` of each layer's input (``[C_in]``), the
    layers whose input is the very tensor a normalization module returned (seen by identity, so
    it works without a graph), the number of batches, and the first batch
    ``(args, kwargs, outputs)`` for the FP32 check."""
    device = model_device(model)
    names = sorted(layers)
    absmax = {n: torch.zeros(layers[n].weight_fp.shape[1], device=device) for n in names}
    fed = torch.zeros(len(names), device=device)
    norm_out: dict[str, torch.Tensor] = {}  # this batch's normalization outputs

    def on_norm(mod: nn.Module, _args: tuple, out: Any, name: str = "") -> None:
        norm_out[name] = out

    def on_layer(_mod: nn.Module, args: tuple, k: int = 0, name: str = "") -> None:
        x = args[0].detach()
        torch.maximum(
            absmax[name], x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float(), out=absmax[name]
        )
        if any(args[0] is t for t in norm_out.values()):
            fed[k] = 1.0

    hooks = [
        m.register_forward_hook(functools.partial(on_norm, name=n))
        for n, m in model.named_modules()
        if isinstance(m, NORMS)
    ]
    hooks += [
        layers[n].register_forward_pre_hook(functools.partial(on_layer, k=k, name=n))
        for k, n in enumerate(names)
    ]
    first, batches = None, 0

    def run(batches_in: Iterable[Any]) -> None:
        nonlocal first, batches
        for i, (args, kwargs) in progress(
            iter_batches(batches_in, config.num_batches), config.progress, "smoothquant"
        ):
            args, kwargs = to_device(args, kwargs, device)
            out = run_model(model, i, args, kwargs)
            norm_out.clear()
            if first is None:
                first = (args, kwargs, [t.detach().clone() for t in _tensors(out)])
            batches += 1

    try:
        with torch.no_grad():
            if active():
                error = distributed.run_on_shard(run, data)
                distributed.agree(model, "smoothquant", config, error, (batches, 0))
                distributed.all_reduce_max([*(absmax[n] for n in names), fed])
            else:
                run(data)
    finally:
        norm_out.clear()
        for h in hooks:
            h.remove()
    fed_names = {n for k, n in enumerate(names) if fed[k] > 0}
    return absmax, fed_names, batches, first


def _consumers(node: fx.Node, gm: fx.GraphModule) -> set[fx.Node]:
    """Users of ``node``, looking through activation quantizers."""
    out: set[fx.Node] = set()
    for u in node.users:
        if u.op == "call_module" and isinstance(submodule(gm, u), ActQuant):
            out |= set(u.users)
        else:
            out.add(u)
    return out


def foldable_norm(
    src: fx.Node, group: list[fx.Node], gm: fx.GraphModule
) -> nn.LayerNorm | nn.RMSNorm | None:
    """The normalization module producing ``src`` if ``1/s`` can be folded into its affine
    parameters: it is called once and its output feeds the layers of ``group`` only."""
    if src.op != "call_module":
        return None
    norm = submodule(gm, src)
    if not isinstance(norm, NORMS) or getattr(norm, "weight", None) is None:
        return None
    if len(norm.normalized_shape) != 1:
        return None
    calls = sum(n.op == "call_module" and n.target == src.target for n in gm.graph.nodes)
    return norm if calls == 1 and _consumers(src, gm) == set(group) else None


def _plan(
    model: nn.Module, names: set[str]
) -> list[tuple[list[str], nn.LayerNorm | nn.RMSNorm | tuple[fx.GraphModule, fx.Node] | None]]:
    """Groups of layers sharing one ``s``: ``([names], how)`` where ``how`` is a normalization
    module (fold), ``(gm, layer node)`` (an explicit quantizer in the graph) or ``None`` (an
    explicit quantizer inside the layer, no graph)."""
    if not isinstance(model, fx.GraphModule):
        return [([n], None) for n in sorted(names)]
    gm = model
    by_src: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in names:
            by_src.setdefault(node.args[0].args[0], []).append(node)
    plan: list[
        tuple[list[str], nn.LayerNorm | nn.RMSNorm | tuple[fx.GraphModule, fx.Node] | None]
    ] = []
    for src, group in by_src.items():
        norm = foldable_norm(src, group, gm)
        if norm is not None:
            plan.append(([target_name(n) for n in group], norm))
        else:
            plan += [([target_name(n)], (gm, n)) for n in group]
    return plan


def explicit_in_graph(gm: fx.GraphModule, node: fx.Node, inv: torch.Tensor) -> None:
    """Give ``node`` (a layer) its own :class:`SmoothedActQuant`, reading the tensor its current
    input quantizer reads; that quantizer goes when nothing else uses it."""
    old = input_node(node)
    q_old = submodule(gm, old)
    if not isinstance(q_old, ActQuant):
        raise ModelError(f"smoothquant: the input of {node.target} is not an activation quantizer")
    name = f"aq_sq_{node.name}"
    gm.add_submodule(name, SmoothedActQuant(q_old.spec, f"input of {node.target} (smoothed)", inv))
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (old.args[0],))
    node.replace_input_with(old, new)
    if not old.users:
        gm.graph.erase_node(old)
        gm.delete_submodule(target_name(old))


def smooth(model: nn.Module, data: Iterable[Any], config: PTQConfig, info: PTQInfo) -> None:
    """Apply SmoothQuant with ``α = config.smoothquant`` to every quantized ``nn.Linear`` of
    ``model`` (a prepared model, before calibration) in place; see the module docstring. A
    layer a scope turns SmoothQuant off for (:meth:`PTQConfig.off_layers`) keeps its weights
    and input as they are (recorded in ``off_by_scope``)."""
    alpha = config.smoothquant
    if alpha is None or config.activations is None:
        if alpha is not None:
            info.warn("smoothquant has no effect without activation quantization; skipped")
        return
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"smoothquant alpha must be in [0, 1], got {alpha!r}")
    layers = candidates(model)
    details: SmoothQuantRecord = {"alpha": float(alpha), "layers": {}}
    off = config.off_layers("smoothquant", quant_layers(model))  # a scope's: left as they are
    if off:  # (a normalization an off layer reads is not folded into: explicit scales instead)
        layers = {n: m for n, m in layers.items() if n not in off}
        details["off_by_scope"] = off
    info.details["smoothquant"] = details
    if not layers:
        info.warn("smoothquant: no quantized nn.Linear with an input quantizer; nothing smoothed")
        return
    absmax, fed, batches, first = collect_stats(model, layers, data, config)
    if isinstance(model, fx.GraphModule):
        fed |= _norm_fed_in_graph(model, set(layers))
    details["extra_data_pass_batches"] = batches
    for n in sorted(set(layers) - fed):
        details["layers"][n] = "not smoothed: its input is not a normalization's output"
    if not fed:
        info.warn("smoothquant: no quantized nn.Linear reads a LayerNorm output; nothing smoothed")
        return
    plan = _plan(model, fed)
    scales = []
    for names, how in plan:
        x_max = torch.stack([absmax[n] for n in names]).amax(dim=0)
        w_max = torch.stack([layers[n].weight_fp.abs().amax(dim=0) for n in names]).amax(dim=0)
        s = smoothing_scale(x_max, w_max, alpha)
        scales.append(s)
        for n in names:
            layers[n].set_float_weight(layers[n].weight_fp * s.to(layers[n].weight_fp.device))
        if isinstance(how, NORMS):
            ln_name = next(k for k, m in model.named_modules() if m is how)
            gamma, beta = tensor_attr(how, "weight"), optional_tensor_attr(how, "bias")
            with torch.no_grad():  # RMSNorm has no bias
                gamma.div_(s.to(gamma.device))
                if beta is not None:
                    beta.div_(s.to(beta.device))
            for n in names:
                details["layers"][n] = f"folded into {ln_name}"
        elif how is None:
            layer = layers[names[0]]
            old = layer.input_quant
            assert old is not None  # candidates() keeps only layers with an input quantizer
            layer.input_quant = SmoothedActQuant(old.spec, f"{old.label} (smoothed)", 1.0 / s)
            details["layers"][names[0]] = "explicit scale"
        else:
            gm, node = how
            explicit_in_graph(gm, node, 1.0 / s)
            details["layers"][names[0]] = "explicit scale"
    if isinstance(model, fx.GraphModule):
        model.graph.lint()
        model.recompile()
    info.quantizers = {n: q.label for n, q in act_quants(model).items()}
    all_s = torch.cat([s.cpu() for s in scales])
    details["scale_range"] = [float(all_s.min()), float(all_s.max())]
    if first is not None:
        args, kwargs, before = first
        with torch.no_grad():
            after = _tensors(run_model(model, 0, args, kwargs))
        change = _rel_change(before, after)
        details["fp32_max_rel_change"] = change
        if change > TOLERANCE:
            info.warn(
                f"smoothquant changed the FP32 output by {change:.2e} (relative) on the first "
                "batch; a smoothed layer's input may be modified in place or reused elsewhere"
            )
