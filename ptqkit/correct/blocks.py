"""The blocks of block reconstruction (BRECQ, Li et al. 2021, "BRECQ: Pushing the Limit of
Post-Training Quantization by Block Reconstruction"), read off a traced graph.

A **cut** is a point of the graph's execution order where exactly one value is alive: the node
just run, and every later node reads only it (and constants: ``get_attr`` nodes). Between two
cuts lies a **segment**, a piece of the network with one input and one output. A residual or
inverted-residual block is one segment (the skip keeps its input alive until the add); a plain
chain of layers has a cut after every node.

Blocks are segments taken in order and merged while they hold at most ``max_layers``
:class:`~ptqkit.quant.modules.QuantLayer` calls (segments without layers, such as pooling, join
the block before them): a residual block is reconstructed as a whole, however many layers it
holds, and a chain is reconstructed ``max_layers`` layers at a time, which is how BRECQ treats
the blocks of a network (the residual bottleneck; for MobileNetV2 the inverted residual, with or
without its skip).

:func:`split` returns ``None`` (and :func:`why_not` says why) when the graph cannot be cut this
way: several inputs used after the first layer, several outputs, a layer called twice.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from ..graph import module_calls
from ..quant.modules import quant_layers


@dataclass
class Block:
    """A piece of the graph with one input value (``source``) and one output (``nodes[-1]``)."""

    source: fx.Node
    nodes: list[fx.Node] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)


def _cuts(gm: fx.GraphModule) -> tuple[list[int], list[fx.Node]]:
    """Indices (into the graph's nodes, output excluded) after which only that node is alive."""
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    index = {n: i for i, n in enumerate(nodes)}
    last_use: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        for a in n.all_input_nodes:
            last_use[a] = index.get(n, len(nodes))  # the output node reads after everything
    alive: set[fx.Node] = set()
    cuts = []
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            if last_use.get(a) == i:
                alive.discard(a)
        if n.op != "get_attr" and last_use.get(n, -1) > i:
            alive.add(n)
        if alive == {n}:
            cuts.append(i)
    return cuts, nodes


def why_not(gm: fx.GraphModule) -> str | None:
    """Why :func:`split` cannot cut ``gm`` into blocks, or ``None`` if it can."""
    layers = quant_layers(gm)
    twice = sorted(t for t, k in module_calls(gm).items() if t in layers and k > 1)
    if twice:
        return f"layer {twice[0]} is called more than once"
    cuts, nodes = _cuts(gm)
    if not cuts:
        return "no point of the graph where a single value is alive"
    first = cuts[0]
    early = [n for n in nodes[: first + 1] if n.op == "call_module" and n.target in layers]
    if early:
        return f"layer {early[0].target} runs before the inputs are merged into one value"
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if out.all_input_nodes != [nodes[cuts[-1]]]:
        return "the graph returns more than one value"
    if cuts[-1] != len(nodes) - 1:
        return "the graph's last nodes do not end in a single value"
    return None


def split(gm: fx.GraphModule, max_layers: int) -> list[Block] | None:
    """The blocks of ``gm`` (see the module docstring), or ``None`` (:func:`why_not`)."""
    if why_not(gm) is not None:
        return None
    layers = quant_layers(gm)
    cuts, nodes = _cuts(gm)
    blocks: list[Block] = []
    current: Block | None = None
    for a, b in itertools.pairwise(cuts):
        segment = nodes[a + 1 : b + 1]
        names = [str(n.target) for n in segment if n.op == "call_module" and n.target in layers]
        full = bool(names) and len(current.layers if current else []) + len(names) > max_layers
        if current is None or (full and current.layers):
            current = Block(source=nodes[a])
            blocks.append(current)
        current.nodes.extend(segment)
        current.layers.extend(names)
    return [blk for blk in blocks if blk.layers]


def run(
    gm: fx.GraphModule,
    block: Block,
    x: Any,
    call: Callable[[nn.Module, tuple, dict], Any] | None = None,
) -> Any:
    """The output of ``block`` on input value ``x`` (the block's nodes run in order, as the
    graph module would run them). ``call(module, args, kwargs)``, when given, runs the
    ``call_module`` nodes instead of the module itself."""
    interp = fx.Interpreter(gm)
    env: dict[fx.Node, Any] = {block.source: x}

    def load(a: fx.Node) -> Any:
        if a in env:
            return env[a]
        if a.op == "get_attr":
            return interp.fetch_attr(str(a.target))
        raise RuntimeError(f"block reconstruction: {a} is read across a cut")  # split's contract

    for n in block.nodes:
        if n.op == "placeholder":  # an input the graph never reads (split's contract)
            env[n] = None
            continue
        args, kwargs = fx.node.map_arg(n.args, load), fx.node.map_arg(n.kwargs, load)
        if n.op == "call_module" and call is not None:
            env[n] = call(gm.get_submodule(str(n.target)), args, kwargs)
        else:
            env[n] = getattr(interp, n.op)(n.target, args, kwargs)
    return env[block.nodes[-1]]


__all__ = ["Block", "run", "split", "why_not"]
