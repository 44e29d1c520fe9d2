"""Capture: trace the model with ``torch.fx`` so that ptqkit knows which tensor feeds which op.

Quantizable layers (Conv/Linear and their subclasses) and the standard ``torch.nn`` modules are
leaves of the trace, so a subclass such as a "same padding" conv keeps its own ``forward``.
A model that ``torch.fx`` cannot trace (data-dependent control flow, ...) is reported with the
reason, and the pipeline falls back to wrapping its layers in place.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from ..errors import ModelError
from ..graph import module_calls
from ..quant.modules import TRANSPOSED_LAYERS, WEIGHT_LAYERS, ActQuant, QuantLayer, out_channels
from ..typed import target_name


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (*WEIGHT_LAYERS, ActQuant, QuantLayer)):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> tuple[fx.GraphModule | None, str]:
    """``(graph_module, "")`` or ``(None, reason)`` when the model cannot be traced.

    ``model`` is copied; the copy is what the graph module owns.
    """
    try:
        root = copy.deepcopy(model)
        graph = _Tracer().trace(root)
        gm = fx.GraphModule(root, graph, root.__class__.__name__)
    except Exception as e:  # any failure of the tracer means "not traceable"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return None, reason[:300]
    return gm, ""


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_bn_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold an eval-mode BatchNorm into the preceding conv/linear, in place:

    ``w' = w · γ/√(σ²+ε)`` (per output channel), ``b' = (b - μ)·γ/√(σ²+ε) + β``.
    The BatchNorm's view of the output distribution, mean ``β`` and std ``|γ|`` per channel, is
    kept on the layer as the non-persistent buffers ``bn_mean`` and ``bn_std``.
    """
    if not isinstance(layer, WEIGHT_LAYERS) or not isinstance(bn, _BATCHNORMS):
        raise ModelError(
            f"cannot fold {type(bn).__name__} into {type(layer).__name__}: "
            "expected a BatchNorm after a Conv/Linear"
        )
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        raise ModelError(f"cannot fold {type(bn).__name__}: it keeps no running statistics")
    w = layer.weight.detach()
    inv = (
        bn.weight.detach() / torch.sqrt(var + bn.eps)
        if bn.affine
        else (1.0 / torch.sqrt(var + bn.eps))
    )
    beta = bn.bias.detach() if bn.affine else torch.zeros_like(mean)
    b = layer.bias.detach() if layer.bias is not None else torch.zeros_like(mean)
    if isinstance(layer, TRANSPOSED_LAYERS):
        # weight [in, out/g, k...]: output channel g·(out/g) + j is [g-th block of rows, j]
        g = layer.groups
        blocks = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        scale = inv.reshape(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
        new_w = (blocks * scale).reshape(w.shape)
    else:
        new_w = w * inv.reshape([-1] + [1] * (w.dim() - 1))
    new_b = (b - mean) * inv + beta
    layer.weight = nn.Parameter(new_w, requires_grad=False)
    layer.bias = nn.Parameter(new_b, requires_grad=False)
    # what the BatchNorm said about the layer's output (per channel: mean β, std |γ|), kept for
    # the data-free stages that need it once the BatchNorm is gone (CLE bias absorption,
    # analytic bias correction); not saved with the model
    gamma = bn.weight.detach() if bn.affine else torch.ones_like(mean)
    layer.register_buffer("bn_mean", beta.detach().clone().float(), persistent=False)
    layer.register_buffer("bn_std", gamma.abs().clone().float(), persistent=False)


def fold_batchnorms(gm: fx.GraphModule) -> list[str]:
    """Fold every BatchNorm that directly follows a conv/linear used once; returns their names."""
    modules = dict(gm.named_modules())
    calls = module_calls(gm)
    folded = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BATCHNORMS):
            continue
        prev = node.args[0] if node.args else None
        if not (isinstance(prev, fx.Node) and prev.op == "call_module"):
            continue
        prev_name = target_name(prev)
        layer = modules.get(prev_name)
        if not isinstance(layer, WEIGHT_LAYERS) or len(prev.users) != 1 or calls[prev_name] != 1:
            continue
        bn = modules[node.target]
        if bn.running_mean is None or out_channels(layer) != bn.num_features:
            continue
        fold_bn_into(layer, bn)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded.append(node.target)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded
