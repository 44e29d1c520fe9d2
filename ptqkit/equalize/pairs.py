"""The layer pairs cross-layer equalization works on (:mod:`ptqkit.equalize.cle`): two wrapped
layers ``L1 → L2`` joined by a single-user chain of ops that commute with a positive per-channel
scaling (at most one clipping activation, activation quantizers still off, identity/dropout,
max-pooling, adaptive average pooling, ``flatten(x, 1)`` into a Linear), with their channels
lining up."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import ModelError
from ..graph import activation_bounds, input_channel_view, is_flatten_1, module_calls
from ..quant.modules import ActQuant, QuantLayer
from ..typed import submodule, target_name

# -- the ops a pair may have between its two layers ------------------------------------------------
_TRANSPARENT = (ActQuant, nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_TRANSPARENT_FN = {F.dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d, "contiguous"}
_POOL_TO_ONE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_INF = math.inf


def _transparent(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` commutes with a positive per-channel scale and a per-channel shift
    (activation quantizers are still off while CLE runs)."""
    if node.op == "call_module":
        return isinstance(submodule(gm, node), (*_TRANSPARENT, *_POOL_TO_ONE))
    return node.op in ("call_function", "call_method") and node.target in _TRANSPARENT_FN


@dataclass
class Pair:
    first: str
    second: str
    channels: int
    axis: int  # channel axis of the tensor between them (1 for convs, -1 for Linear)
    lo: torch.Tensor  # current activation bounds per channel (float64)
    hi: torch.Tensor
    lo0: torch.Tensor  # the bounds before CLE
    hi0: torch.Tensor
    scale_total: torch.Tensor
    act: fx.Node | None = None
    act_kind: str = "identity"
    absorbed: float = 0.0
    notes: list[str] = field(default_factory=list)


def _walk(
    node: fx.Node, gm: fx.GraphModule, calls: dict[str, int]
) -> tuple[fx.Node, fx.Node | None, tuple | None, bool] | str:
    """From the output of a wrapped layer to the next wrapped layer: ``(second node, activation
    node, bounds, flattened)``, or a reason string when the chain does not qualify."""
    cur, act, bounds, flat = node, None, None, False
    while True:
        if len(cur.users) != 1:
            return (
                "its output has several users" if cur is node else f"{cur.name} has several users"
            )
        u = next(iter(cur.users))
        if u.op == "call_module" and isinstance(submodule(gm, u), QuantLayer):
            if not u.args or u.args[0] is not cur or calls.get(target_name(u), 0) != 1:
                return f"{u.target} is called more than once or on another input"
            return u, act, bounds, flat
        b = activation_bounds(u, gm)
        if b is not None:
            if act is not None:
                return "two activations in a row"
            if flat:
                return "an activation after flatten"
            act, bounds = u, b
        elif is_flatten_1(u, gm):
            flat = True
        elif not _transparent(u, gm):
            return f"{u.name} ({u.op} {getattr(u.target, '__name__', u.target)}) is in between"
        cur = u


def _as_vec(v: torch.Tensor | float, n: int) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.double().clone()
    return torch.full((n,), float(v), dtype=torch.float64)


def find_pairs(gm: fx.GraphModule) -> tuple[list[Pair], dict[str, str]]:
    """The equalizable pairs of ``gm`` in graph order, and why other layers are not in one."""
    calls = module_calls(gm)
    pairs: list[Pair] = []
    why: dict[str, str] = {}
    for n in gm.graph.nodes:
        q1 = submodule(gm, n) if n.op == "call_module" else None
        if not isinstance(q1, QuantLayer):
            continue
        name = target_name(n)
        if calls[name] != 1:
            why[name] = "called more than once"
            continue
        got = _walk(n, gm, calls)
        if isinstance(got, str):
            why[name] = got
            continue
        second, act, bounds, flat = got
        q2 = _quant_layer(gm, second)
        l1, l2 = q1.layer, q2.layer
        c = q1.weight.shape[0]
        if isinstance(l1, nn.Linear) and not isinstance(l2, nn.Linear):
            why[name] = "Linear followed by a conv"
            continue
        if flat != (isinstance(l2, nn.Linear) and not isinstance(l1, nn.Linear)):
            why[name] = "conv into Linear without flatten(x, 1), or flatten between Linears"
            continue
        if input_channel_view(l2, q2.weight, c) is None:
            why[name] = f"its {c} output channels do not line up with {second.target}'s input"
            continue
        axis = -1 if isinstance(l1, nn.Linear) else 1
        lo, hi = bounds if bounds is not None else (-_INF, _INF)
        lo, hi = _as_vec(lo, c), _as_vec(hi, c)
        pairs.append(
            Pair(
                first=name,
                second=target_name(second),
                channels=c,
                axis=axis,
                act=act,
                act_kind=_act_name(act, gm),
                lo=lo,
                hi=hi,
                lo0=lo.clone(),
                hi0=hi.clone(),
                scale_total=torch.ones(c, dtype=torch.float64),
            )
        )
    return pairs, why


def _quant_layer(gm: fx.GraphModule, node: fx.Node) -> QuantLayer:
    q = submodule(gm, node)
    if not isinstance(q, QuantLayer):
        raise ModelError(f"CLE: {node.target} is a {type(q).__name__}, not a QuantLayer")
    return q


def _act_name(node: fx.Node | None, gm: fx.GraphModule) -> str:
    if node is None:
        return "identity"
    t = node.target
    if node.op == "call_module":
        return type(submodule(gm, node)).__name__
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


__all__ = ["Pair", "find_pairs"]
