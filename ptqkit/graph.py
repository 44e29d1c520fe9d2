"""What the nodes of a prepared ``torch.fx`` graph are, for the stages that walk it (placement,
CLE, bias correction, AdaRound, sensitivity, fallback): the clipping bounds of an activation node
(:func:`activation_bounds`), whether a node is ``flatten(x, 1)`` (:func:`is_flatten_1`), the
per-input-channel view of a layer's weight (:func:`input_channel_view`), the one set of op
registries (quantized ops, clipping activations, value-preserving ops: ``QUANT_*``, ``ACT_*``,
``PASS_*``) and the walks over them (:func:`through_passthrough` back to the node a value comes
from, :func:`after_activations` forward past a layer's activation, :func:`input_quantizer`).

:class:`ChannelClamp`, the per-channel clip that cross-layer equalization installs in place of a
ReLU6 (see :mod:`ptqkit.equalize.cle`), lives here too: it is one of the activations
:func:`activation_bounds` knows, and a saved model replays it without depending on CLE.

Low level: imports torch and ptqkit's quantized modules only (no ptqkit stage).
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .quant.modules import ActQuant, QuantLayer
from .typed import submodule, target_name


class ChannelClamp(nn.Module):
    """``y = min(max(x, lo_c), hi_c)`` with per-channel bounds along ``axis`` (``±inf`` allowed).

    What a ReLU / ReLU6 / Hardtanh becomes once CLE has scaled (and bias absorption shifted) its
    input channels. A lower bound of exactly 0 everywhere runs as ``relu``.
    """

    lo: torch.Tensor
    hi: torch.Tensor

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, axis: int = 1) -> None:
        super().__init__()
        self.axis = axis
        self.register_buffer("lo", lo.detach().float().clone())
        self.register_buffer("hi", hi.detach().float().clone())
        self._flags()

    def _flags(self) -> None:
        self.relu = bool((self.lo == 0).all())
        self.has_lo = bool(torch.isfinite(self.lo).any())
        self.has_hi = bool(torch.isfinite(self.hi).any())

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._flags()

    def extra_repr(self) -> str:
        return f"channels={self.lo.numel()}, axis={self.axis}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.axis] = -1
        if self.relu:
            x = torch.relu(x)
        elif self.has_lo:
            x = torch.maximum(x, self.lo.to(x.dtype).reshape(shape))
        if self.has_hi:
            x = torch.minimum(x, self.hi.to(x.dtype).reshape(shape))
        return x


def node_arg(node: fx.Node, i: int, name: str, default: object) -> object:
    """Argument ``i`` (keyword ``name``) of a call node, or ``default`` when not given."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def activation_bounds(node: fx.Node, gm: fx.GraphModule) -> tuple | None:
    """``(lo, hi)`` of a clipping activation node (floats, or tensors for a ChannelClamp)."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, ChannelClamp):
            return m.lo.double(), m.hi.double()
        if isinstance(m, nn.ReLU):
            return 0.0, math.inf
        if isinstance(m, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
            return float(m.min_val), float(m.max_val)
        return None
    t = node.target
    if t in (F.relu, torch.relu, "relu"):
        return 0.0, math.inf
    if t is F.relu6:
        return 0.0, 6.0
    if t is F.hardtanh:
        lo, hi = node_arg(node, 1, "min_val", -1.0), node_arg(node, 2, "max_val", 1.0)
    elif t in (torch.clamp, torch.clip, "clamp", "clip"):
        lo, hi = node_arg(node, 1, "min", None), node_arg(node, 2, "max", None)
        lo = -math.inf if lo is None else lo
        hi = math.inf if hi is None else hi
    else:
        return None
    if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float))):
        return None
    return float(lo), float(hi)


def activation_after(model: nn.Module, name: str) -> tuple | None:
    """``(lo, hi)`` of the clipping activation that is the only user of module ``name``'s output
    in ``model``'s traced graph (see :func:`activation_bounds`), or ``None`` (none, several
    users, or an untraced model)."""
    if not isinstance(model, fx.GraphModule):
        return None
    for node in model.graph.nodes:
        if node.op == "call_module" and node.target == name and len(node.users) == 1:
            return activation_bounds(next(iter(node.users)), model)
    return None


def is_flatten_1(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` is ``flatten(x, 1)`` (``nn.Flatten()`` or ``torch.flatten(x, 1)``)."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if node.target in (torch.flatten, "flatten"):
        return node_arg(node, 1, "start_dim", 0) == 1 and node_arg(node, 2, "end_dim", -1) == -1
    return False


def input_channel_view(layer: nn.Module, w: torch.Tensor, channels: int) -> torch.Tensor | None:
    """``w`` as ``[groups, out per group, in channels per group, rest]``, so that input channel
    ``g·cpg + j`` is ``[g, :, j, :]``; ``None`` when the channels do not line up."""
    if isinstance(layer, nn.Linear):
        if w.shape[1] % channels:
            return None
        return w.reshape(1, w.shape[0], channels, -1)
    g = getattr(layer, "groups", None)  # a conv
    if not isinstance(g, int):
        return None
    cpg = w.shape[1]
    if g * cpg != channels:
        return None
    return w.reshape(g, w.shape[0] // g, cpg, -1)


# -- op registries -------------------------------------------------------------------------------
#: ops whose output is quantized and whose tensor inputs must be on a grid
QUANT_FUNCTIONS = {
    operator.add,
    torch.add,
    operator.mul,
    torch.mul,
    torch.cat,
    torch.concat,
    torch.matmul,
    operator.matmul,
    torch.bmm,
}
QUANT_METHODS = {"add", "mul", "matmul", "bmm"}
#: clipping activations: the output quantizer moves after them
ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
ACT_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, torch.clamp, torch.clip}
ACT_METHODS = {"relu", "clamp", "clip"}
#: value-preserving ops: their output is on the grid of their input
PASS_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Identity,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ChannelShuffle,
)
PASS_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.transpose,
    torch.permute,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.dropout,
}
PASS_METHODS = {
    "view",
    "reshape",
    "flatten",
    "permute",
    "transpose",
    "squeeze",
    "unsqueeze",
    "contiguous",
}


def module_calls(gm: fx.GraphModule) -> Counter[str]:
    """How many ``call_module`` nodes of ``gm``'s graph call each module (by qualified name): a
    module called more than once runs on several inputs with one set of weights."""
    return Counter(target_name(n) for n in gm.graph.nodes if n.op == "call_module")


def called_module(gm: nn.Module, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, ``None`` for other nodes."""
    return submodule(gm, node) if node.op == "call_module" else None


def _in(node: fx.Node, gm: nn.Module, mods: tuple, funcs: set, methods: set) -> bool:
    if node.op == "call_module":
        return isinstance(called_module(gm, node), mods)
    if node.op == "call_function":
        return node.target in funcs
    return node.op == "call_method" and node.target in methods


def is_quant_op(node: fx.Node, gm: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(called_module(gm, node), QuantLayer)
    if node.target in (operator.mul, torch.mul, "mul"):  # only activation × activation
        return sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2
    return _in(node, gm, (), QUANT_FUNCTIONS, QUANT_METHODS)


def is_activation(node: fx.Node, gm: nn.Module) -> bool:
    """A clipping activation: one of the ``ACT_*`` registries, or the :class:`ChannelClamp` CLE
    puts in the place of one."""
    return _in(node, gm, (*ACT_MODULES, ChannelClamp), ACT_FUNCTIONS, ACT_METHODS)


def is_passthrough(node: fx.Node, gm: nn.Module) -> bool:
    """A value-preserving op (the ``PASS_*`` registries): its output is on its input's grid."""
    return _in(node, gm, PASS_MODULES, PASS_FUNCTIONS, PASS_METHODS)


def through_passthrough(node: fx.Node, gm: nn.Module) -> fx.Node:
    """The node whose value ``node`` carries unchanged: back along the first argument of
    value-preserving ops (:func:`is_passthrough`) as far as that argument is a node."""
    while is_passthrough(node, gm) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def after_activations(node: fx.Node, gm: nn.Module) -> fx.Node:
    """The last of the clipping activations (:func:`is_activation`) that follow ``node`` one
    after another, each the only user of the one before; ``node`` itself when none does."""
    while len(node.users) == 1 and is_activation(next(iter(node.users)), gm):
        node = next(iter(node.users))
    return node


def input_quantizer(node: fx.Node, gm: nn.Module) -> fx.Node | None:
    """The :class:`~ptqkit.quant.modules.ActQuant` call whose output reaches the first argument
    of ``node`` unchanged (through value-preserving ops), or ``None``."""
    a = node.args[0] if node.args else None
    if not isinstance(a, fx.Node):
        return None
    a = through_passthrough(a, gm)
    return a if isinstance(called_module(gm, a), ActQuant) else None


__all__ = [
    "ACT_FUNCTIONS",
    "ACT_METHODS",
    "ACT_MODULES",
    "PASS_FUNCTIONS",
    "PASS_METHODS",
    "PASS_MODULES",
    "QUANT_FUNCTIONS",
    "QUANT_METHODS",
    "ChannelClamp",
    "activation_after",
    "activation_bounds",
    "after_activations",
    "called_module",
    "input_channel_view",
    "input_quantizer",
    "is_activation",
    "is_flatten_1",
    "is_passthrough",
    "is_quant_op",
    "module_calls",
    "node_arg",
    "through_passthrough",
]
