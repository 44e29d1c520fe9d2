"""Functionalise in-place ops in a traced graph, so that quantizers land on the value a layer
actually consumes.

``torch.fx`` records ``x.div_(255).sub_(0.5); y = conv(x)`` as ``conv(x)``: the conv's input node
is ``x``, whose *value* the two in-place calls change before the conv runs. A quantizer inserted
on ``x`` would read it before the in-place chain and hand the conv an un-normalised copy. The
same holds for ``out.add_(x); out.relu_()``, ``F.relu(h, inplace=True)`` and
``nn.ReLU(inplace=True)``.

Rewrite: each in-place call ``n = base.op_(...)`` becomes ``n' = base.op(...)`` and every use
of ``base`` *after* ``n`` (in graph order, which is execution order) reads ``n'`` instead, so the
graph's data flow shows the value each op consumes and the placement rules (quantizer after the
last in-place op of a chain, an ``add_`` is an add, a ``relu_`` a clipping activation) apply as
for out-of-place code. The copy then no longer writes into the caller's input tensor.

Not rewritten (left as they are, the equivalence check of :mod:`.verify` judges the result):
in-place ops on a view (``x[:, :3].mul_(2)``), on a tensor some view of which was taken before
the op (the view would see the mutation), on parameters/buffers (``get_attr``), and in-place
methods with no out-of-place twin (``copy_``, ``zero_``, ``fill_``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import Target

from ..typed import submodule

#: in-place functions → their out-of-place twin
INPLACE_FUNCTIONS: dict[Target, Callable[..., Any]] = {
    torch.relu_: torch.relu,
    F.relu_: F.relu,
    torch.sigmoid_: torch.sigmoid,
    torch.tanh_: torch.tanh,
    torch.clamp_: torch.clamp,
}
#: functions / modules with an ``inplace`` flag
INPLACE_FLAG_FUNCTIONS = {F.relu, F.relu6, F.hardtanh, F.leaky_relu, F.elu, F.selu, F.celu,
                          F.hardswish, F.hardsigmoid, F.silu, F.mish, F.dropout, F.threshold}
INPLACE_FLAG_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
                        nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Mish, nn.Threshold)
#: method names ending in ``_`` that are not value mutations with an out-of-place twin
NOT_REWRITTEN = {"requires_grad_", "share_memory_", "copy_", "zero_", "fill_", "set_", "resize_",
                 "resize_as_", "detach_", "normal_", "uniform_", "random_", "bernoulli_",
                 "exponential_", "geometric_", "cauchy_", "log_normal_", "index_put_"}
#: ops whose output may share memory with their input
VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "permute", "transpose",
                "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "unfold", "t",
                "chunk", "split", "unbind", "contiguous", "detach", "as_strided", "__getitem__",
                "movedim", "swapaxes", "unflatten", "diagonal", "real", "imag", "to", "type",
                "float", "half", "double"}
VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                  torch.transpose, torch.permute, torch.chunk, torch.split, torch.unbind,
                  torch.narrow, torch.select, torch.detach, torch.movedim, torch.swapaxes,
                  torch.diagonal, torch.t, torch.unflatten}
VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout)


def _is_view(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_method":
        return node.target in VIEW_METHODS
    if node.op == "call_function":
        return node.target in VIEW_FUNCTIONS
    if node.op == "call_module":
        return isinstance(submodule(gm, node), VIEW_MODULES)
    return node.op == "get_attr"


def _twin(node: fx.Node, gm: fx.GraphModule) -> tuple[str, Target, dict] | None:
    """``(op, out-of-place target, kwargs)`` of an in-place node, else ``None``."""
    if node.op == "call_method" and isinstance(node.target, str):
        name = node.target
        mutates = name.endswith("_") and not name.endswith("__") and name not in NOT_REWRITTEN
        if mutates and callable(getattr(torch.Tensor, name[:-1], None)):
            return "call_method", name[:-1], dict(node.kwargs)
        return None
    if node.op == "call_function":
        if node.target in INPLACE_FUNCTIONS:
            return "call_function", INPLACE_FUNCTIONS[node.target], dict(node.kwargs)
        if node.target in INPLACE_FLAG_FUNCTIONS and node.kwargs.get("inplace") is True:
            return "call_function", node.target, {**node.kwargs, "inplace": False}
        return None
    if node.op == "call_module":
        m = submodule(gm, node)
        if isinstance(m, INPLACE_FLAG_MODULES) and getattr(m, "inplace", False):
            return "call_module", node.target, dict(node.kwargs)
    return None


def functionalize(gm: fx.GraphModule) -> list[str]:
    """Rewrite the in-place ops of ``gm`` (see the module docstring); returns the rewritten
    node names. In-place activation modules of the copy get ``inplace=False``."""
    graph = gm.graph
    done: list[str] = []
    for node in list(graph.nodes):
        twin = _twin(node, gm)
        if twin is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        base = node.args[0]
        order = {n: i for i, n in enumerate(graph.nodes)}
        if _is_view(base, gm) or any(
            _is_view(u, gm) and order[u] < order[node] for u in base.users
        ):
            continue  # another tensor shares the memory: leave the mutation as it is
        op, target, kwargs = twin
        if op == "call_module":
            m = submodule(gm, node)
            assert isinstance(m, INPLACE_FLAG_MODULES)  # what _twin rewrites
            m.inplace = False
            new = node
        else:
            with graph.inserting_after(node):
                new = graph.create_node(op, target, node.args, kwargs, name=f"{node.name}_f")
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        for u in list(base.users):
            if u is not new and order.get(u, -1) > order[node]:
                u.replace_input_with(base, new)
        done.append(node.name if new is node else new.name)
    if done:
        graph.lint()
        gm.recompile()
    return done
