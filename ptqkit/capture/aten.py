"""Lift an ATen graph (``ExportedProgram.module()``) back to ``nn`` modules and ``torch``
functions: ``aten.conv2d``/``linear``/``batch_norm`` calls whose weights are graph attributes
become ``nn.Conv2d``/``nn.Linear``/``nn.BatchNorm2d`` modules again (named after their weights),
and the common ATen ops (ReLU, ReLU6, clamps, adds, cats, matmuls, pooling, reshapes) their
``torch`` functions, so that BatchNorm folding and the quantizer placement rules see the same
graph as for an eager model. Used by the ``torch.export`` capture (:mod:`.torch_export`) and for the
``.pt2`` files the command line reads.

An op it cannot lift (weights that are not attributes, keyword arguments, a training-mode
batch norm) is left as the ATen call: computed in float, never changed.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten  # the namespace of the ATen operators

#: ATen ops and the ``torch`` function (or operator) that computes the same thing
ATEN_FUNCTIONS: dict[Any, Any] = {
    aten.relu.default: torch.relu,
    aten.relu_.default: torch.relu,
    aten.relu6.default: F.relu6,
    aten.hardtanh.default: F.hardtanh,
    aten.hardtanh_.default: F.hardtanh,
    aten.clamp.default: torch.clamp,
    aten.clamp_min.default: torch.clamp_min,
    aten.clip.default: torch.clip,
    aten.mul.Tensor: operator.mul,
    aten.cat.default: torch.cat,
    aten.flatten.using_ints: torch.flatten,
    aten.max_pool2d.default: F.max_pool2d,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.mean.dim: torch.mean,
    aten.matmul.default: torch.matmul,
    aten.view.default: torch.reshape,
    aten.reshape.default: torch.reshape,
    aten.permute.default: torch.permute,
    aten.transpose.int: torch.transpose,
}

#: ATen convolutions and the module class they become
ATEN_CONVS: dict[Any, type[nn.Module]] = {
    aten.conv1d.default: nn.Conv1d,
    aten.conv2d.default: nn.Conv2d,
    aten.conv3d.default: nn.Conv3d,
}

#: batch norm module class by the rank of its output
_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def lift_aten(gm: fx.GraphModule) -> fx.GraphModule:
    """Turn the ATen conv/linear/batch-norm calls of an exported graph back into ``nn`` modules
    (named after their weights) and the ATen ops of :data:`ATEN_FUNCTIONS` into their ``torch``
    functions, in place; returns ``gm``."""
    used: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        t = node.target
        try:
            lifted = _module_of(gm, node)
            if lifted is not None:
                _install(gm, used, node, *lifted)
            elif t == aten.add.Tensor and len(node.args) == 2 and not node.kwargs:
                node.target = operator.add
            elif t in ATEN_FUNCTIONS:
                node.target = ATEN_FUNCTIONS[t]
        except (LookupError, AttributeError, TypeError, IndexError):
            continue  # left as the ATen op: computed in float
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    # ExportedProgram.module() makes train()/eval() raise; the graph is fixed (exported in eval
    # mode) and the lifted modules are in eval mode, so the usual methods are safe again
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)
    return gm


def _attr(gm: fx.GraphModule, node: Any) -> Any:
    """The tensor a ``get_attr`` node reads (``None`` for ``None``); else a LookupError."""
    if node is None:
        return None
    if getattr(node, "op", None) != "get_attr":
        raise LookupError
    obj: Any = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=False)


def _module_of(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, Any] | None:
    """``(module, the node of its weight)`` computing the ATen conv/linear/batch-norm call
    ``node``, or ``None`` for any other op; a LookupError when its weights are not attributes."""
    t, a = node.target, list[Any](node.args)
    if t in ATEN_CONVS and not node.kwargs:
        w, b = _attr(gm, a[1]), _attr(gm, a[2] if len(a) > 2 else None)
        stride, padding, dilation, groups = (a[3:7] + [1, 0, 1, 1][len(a[3:7]) :])[:4]
        conv = ATEN_CONVS[t](
            w.shape[1] * groups,
            w.shape[0],
            tuple(w.shape[2:]),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=b is not None,
        )
        conv.weight = _frozen(w)
        if b is not None:
            conv.bias = _frozen(b)
        return conv, a[1]
    if t == aten.linear.default and not node.kwargs:
        w, b = _attr(gm, a[1]), _attr(gm, a[2] if len(a) > 2 else None)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        lin.weight = _frozen(w)
        if b is not None:
            lin.bias = _frozen(b)
        return lin, a[1]
    if t == aten.batch_norm.default and len(a) >= 8 and not a[5]:  # a[5]: training
        w, b, mean, var = (_attr(gm, x) for x in a[1:5])
        val: Any = node.meta.get("val")
        cls = _NORMS.get(val.dim() if hasattr(val, "dim") else 4, nn.BatchNorm2d)
        bn = cls(mean.shape[0], eps=a[7], momentum=a[6], affine=w is not None)
        bn.running_mean, bn.running_var = mean.detach().clone(), var.detach().clone()
        if w is not None:
            bn.weight, bn.bias = _frozen(w), _frozen(b)
        return bn.eval(), a[1] if w is not None else a[3]
    return None


def _install(
    gm: fx.GraphModule, used: set[str], node: fx.Node, module: nn.Module, weight_node: Any
) -> None:
    """Call ``module`` instead of ``node``; it takes the place of the plain module that held
    its weights (same qualified name) when that one holds nothing else (``used``: the names
    taken so far)."""
    name = weight_node.target.rpartition(".")[0]
    existing = dict(gm.named_modules()).get(name) if name else None
    if existing is None or list(existing.children()) or name in used:
        name = f"{(name or node.name).replace('.', '_')}_{node.name}"
    used.add(name)
    parent, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (node.args[0],))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


__all__ = ["ATEN_CONVS", "ATEN_FUNCTIONS", "lift_aten"]
