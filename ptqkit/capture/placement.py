"""Where quantizers go.

Rules, applied to the traced graph (each op family is an entry of a registry, not a branch):

1. Conv/Linear layers are wrapped in :class:`QuantLayer` (integer weights), unless skipped.
2. The output of every quantized op (layer, add, cat, mul, matmul) is quantized — *after* the
   clipping activation that follows it (ReLU, ReLU6, Hardtanh, clamp), never between, so the
   grid spends no levels on values the activation removes — except the network's own outputs,
   which stay float (the last layer's accumulator is dequantized, as TensorRT does), also when
   they are reached through value-preserving ops or clipping activations (``permute``, ``view``,
   ``flatten``, ``relu``, ...): only the consumers that need a grid read the quantized copy.
3. Every tensor input of a quantized op that is not already on a grid is quantized (model inputs,
   outputs of float ops such as pooling, LayerNorm or a skipped layer). Value-preserving ops
   (max-pool, flatten, reshape, permute, zero padding, dropout, ...) keep their input's grid.
4. One quantizer per tensor, shared by all its quantized consumers.

Without a graph (untraceable model) each layer gets a quantizer on its input instead.

A Linear with a **dynamic** activation spec (``PTQConfig.activations`` or a scope's
``activations``) owns its input quantizer (``QuantLayer.input_quant``, per row at run time, part
of its integer matmul: :mod:`ptqkit.quant.dynamic`): rules 2 and 3 pass it by, so its input
gets no static quantizer and its output is quantized only where a consumer needs a grid (rule
3), as ONNX Runtime's ``quantize_dynamic`` leaves a MatMul's output float. With a dynamic
model-wide spec no static quantizer is placed at all. Convolutions have no dynamic form here
(their features are not the last dim): :class:`~ptqkit.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable

import torch
from torch import fx, nn

from ..config import QuantSpec, Scope
from ..errors import ConfigError
from ..graph import (  # noqa: F401  (op registries: placement.* names kept for callers)
    ACT_FUNCTIONS,
    ACT_METHODS,
    ACT_MODULES,
    PASS_FUNCTIONS,
    PASS_METHODS,
    PASS_MODULES,
    QUANT_FUNCTIONS,
    QUANT_METHODS,
    called_module,
    is_activation,
    is_passthrough,
    is_quant_op,
    through_passthrough,
)
from ..quant.modules import WEIGHT_LAYERS, ActQuant, QuantLayer


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The activation inputs of a quantized op (``cat`` takes a list)."""
    args: Iterable = node.args
    if node.target in (torch.cat, torch.concat):
        seq = node.args[0] if node.args else node.kwargs.get("tensors", ())
        if not isinstance(seq, (list, tuple)):  # e.g. cat(chunk(x)): one node, not a list
            raise TypeError(f"{node.name}: torch.cat of a {type(seq).__name__}, not of a list")
        args = seq
    elif node.op == "call_module":
        args = node.args[:1]
    return [a for a in args if isinstance(a, fx.Node) and a.op != "get_attr"]


def set_dynamic(layer: QuantLayer, spec: QuantSpec, name: str) -> None:
    """Give the Linear ``layer`` its own dynamic input quantizer (ConfigError for other layers)."""
    if not isinstance(layer.layer, nn.Linear):
        raise ConfigError(
            f"{name} ({type(layer.layer).__name__}): dynamic activations (per row of "
            "x.reshape(-1, features)) are for Linear layers; give this layer static "
            "activations (scope the dynamic spec onto the Linears: ('Linear', {'activations': "
            "spec}) with a static PTQConfig.activations) or leave it float (skip)"
        )
    layer.input_quant = ActQuant(spec, f"input of {name} (dynamic)")


def is_dynamic(node: fx.Node, gm: nn.Module) -> bool:
    """``node`` calls a layer that quantizes its own input dynamically."""
    m = called_module(gm, node) if node.op == "call_module" else None
    return isinstance(m, QuantLayer) and m.input_quant is not None and m.input_quant.spec.dynamic


# -- skipping ------------------------------------------------------------------------------------
def skipped(name: str, module: nn.Module, patterns: tuple[str, ...]) -> str | None:
    """The first pattern matching the module's name or class name, else ``None``."""
    for p in patterns:
        if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(type(module).__name__, p):
            return p
    return None


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def wrap_layers(
    root: nn.Module, spec: QuantSpec, patterns: tuple[str, ...], scopes: tuple[Scope, ...] = ()
) -> tuple[list[str], list[str], set[str], dict[str, list[str]]]:
    """Replace every Conv/Linear (not skipped) by a :class:`QuantLayer`, with the weight spec
    its scopes give it (the last matching scope that sets one; ``spec`` otherwise) and the
    dynamic input quantizer of the last matching scope that sets ``activations``; a layer
    whose last matching ``float`` scope says so stays float, like a skipped one.

    Returns ``(wrapped names, skipped names, skip patterns that matched, the labels of the
    scopes that matched each quantizable layer)``.
    """
    wrapped: list[str] = []
    skip: list[str] = []
    used: set[str] = set()
    scoped: dict[str, list[str]] = {}
    for name, m in list(root.named_modules()):
        if not isinstance(m, WEIGHT_LAYERS) or not name or isinstance(m, QuantLayer):
            continue
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        matched = [sc for sc in scopes if sc.matches(name, m)]
        if matched:
            scoped[name] = [sc.label for sc in matched]
        layer_spec = next((sc.weights for sc in reversed(matched) if sc.weights), spec)
        as_float = any(sc.float for sc in matched)
        p = skipped(name, m, patterns)
        if p is not None or as_float:
            skip.append(name)
            if p is not None:
                used.add(p)
            continue
        if layer_spec.per_channel:
            layer_spec = dataclasses.replace(layer_spec, axis=0)
        ql = QuantLayer(m, layer_spec, name)
        act = next((sc.activations for sc in reversed(matched) if sc.activations), None)
        if act is not None:
            set_dynamic(ql, act, name)
        _set_submodule(root, name, ql)
        wrapped.append(name)
    return wrapped, skip, used, scoped


# -- placement -----------------------------------------------------------------------------------
def place_in_graph(gm: fx.GraphModule, spec: QuantSpec) -> list[str]:
    """Insert :class:`ActQuant` nodes into ``gm`` by the rules of the module docstring."""
    if spec.dynamic:
        return place_on_inputs(gm, spec)
    graph = gm.graph
    names: list[str] = []

    def add(after: fx.Node, label: str, prefix: str) -> fx.Node:
        name = f"{prefix}_{after.name}"
        gm.add_submodule(name, ActQuant(spec, label))
        with graph.inserting_after(after):
            q = graph.call_module(name, (after,))
        names.append(name)
        return q

    def describe(n: fx.Node) -> str:
        return str(n.target) if n.op == "call_module" else n.name

    def to_output(u: fx.Node) -> bool:
        """``u`` is a network output, or a value-preserving op or clipping activation whose
        value reaches only network outputs (so what it reads must stay float)."""
        if u.op == "output":
            return True
        if not (is_passthrough(u, gm) or is_activation(u, gm)):
            return False
        return bool(u.users) and all(to_output(v) for v in u.users)

    for node in list(graph.nodes):  # rule 2: outputs, after a following clipping activation
        if not is_quant_op(node, gm) or is_dynamic(node, gm):
            continue
        target = node
        while len(target.users) == 1 and is_activation(next(iter(target.users)), gm):
            target = next(iter(target.users))
        if any(
            u.op == "call_module" and isinstance(called_module(gm, u), ActQuant)
            for u in target.users
        ):
            continue
        float_users = {u for u in target.users if to_output(u)}
        if len(float_users) == len(target.users):
            continue  # the network's outputs stay float (logits keep their resolution)
        label = f"output of {describe(node)}" + (
            f" after {describe(target)}" if target is not node else ""
        )
        q = add(target, label, "aq")
        target.replace_all_uses_with(
            q, delete_user_cb=lambda u, q=q, keep=float_users: u is not q and u not in keep
        )

    def on_grid(n: fx.Node) -> bool:  # an ActQuant's output, through value-preserving ops
        return isinstance(called_module(gm, through_passthrough(n, gm)), ActQuant)

    shared: dict[fx.Node, fx.Node] = {}
    for node in list(graph.nodes):  # rule 3: inputs not on a grid
        if not is_quant_op(node, gm) or is_dynamic(node, gm):
            continue
        for a in tensor_inputs(node):
            if on_grid(a):
                continue
            if a not in shared:
                shared[a] = add(a, f"input of {describe(node)} ({a.name})", "aq_in")
            node.replace_input_with(a, shared[a])
    graph.lint()
    gm.recompile()
    return names


def place_on_inputs(root: nn.Module, spec: QuantSpec) -> list[str]:
    """Fallback without a graph (and a dynamic model-wide ``spec``): a quantizer on the input
    of every :class:`QuantLayer` that has none (a scope's dynamic one stays)."""
    names = []
    for name, m in root.named_modules():
        if isinstance(m, QuantLayer):
            if m.input_quant is None and spec.dynamic:
                set_dynamic(m, spec, name)
            elif m.input_quant is None:
                m.input_quant = ActQuant(spec, f"input of {name}")
            names.append(f"{name}.input_quant")
    return names
