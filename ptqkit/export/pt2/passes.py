"""Exact rewrites of an exported program so that Inductor's int8 patterns match (the pt2
counterpart of :mod:`ptqkit.export.passes`).

``requantize_passthrough``: ``DQ(q) → pad(0)/max_pool/flatten/view… → conv/linear`` becomes
``… → Q → DQ → conv/linear`` with the DQ's own scale and zero point. Inductor (like ONNX Runtime)
only lowers a conv whose input *is* a DQ; a "same padding" conv (EfficientNet's
``Conv2dStaticSamePadding``: ``F.pad`` inside the layer) otherwise stays a float conv. Exact:
the values after those ops are grid values ``(q - z)·s`` (or the real 0 a zero pad adds, which
is the zero point ``z``), and ``Q`` gives back their integers: ``round((q - z)·s · (1/s)) = q - z``
since the float error is far below one half.
"""

from __future__ import annotations

from typing import Any

import torch

#: ops that keep every value (a zero pad adds the real 0, on every grid)
PASSTHROUGH = (
    "pad",
    "constant_pad_nd",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "flatten",
    "view",
    "reshape",
    "clone",
    "contiguous",
    "squeeze",
    "unsqueeze",
)


def _name(node: Any) -> str:
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return ""
    return str(getattr(node.target, "__name__", node.target)).split(".")[0]


def _keeps_values(node: torch.fx.Node) -> bool:
    name = _name(node)
    if name == "pad":  # aten.pad(x, pads, mode="constant", value=None)
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        return mode == "constant" and not value
    if name == "constant_pad_nd":
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
        return not value
    return name in PASSTHROUGH


def _source_dq(x: Any) -> torch.fx.Node | None:
    """The per-tensor DQ that ``x`` is, through value-keeping ops, if it went through one."""
    hops = 0
    while isinstance(x, torch.fx.Node) and _keeps_values(x):
        x, hops = x.args[0], hops + 1
    dq = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    if hops and isinstance(x, torch.fx.Node) and x.target is dq:
        return x
    return None


def requantize_passthrough(gm: torch.fx.GraphModule, layer_ops: tuple[str, ...]) -> int:
    """Insert ``Q → DQ`` (the source DQ's parameters) before every ``layer_ops`` node whose
    input reaches a DQ through value-keeping ops; returns the number of insertions."""
    graph, done = gm.graph, 0
    for node in list(graph.nodes):
        if _name(node) not in layer_ops or not node.args:
            continue
        x = node.args[0]
        dq = _source_dq(x)
        if dq is None or not isinstance(x, torch.fx.Node):
            continue
        ops = torch.ops.quantized_decomposed
        q_op, dq_op = ops.quantize_per_tensor.default, ops.dequantize_per_tensor.default
        params = tuple(dq.args[1:6])  # scale, zero point, qmin, qmax, dtype
        with graph.inserting_before(node):
            q = graph.call_function(q_op, (x, *params))
            new_dq = graph.call_function(dq_op, (q, *params), dict(dq.kwargs))
        val = x.meta.get("val")
        if val is not None:
            q.meta["val"] = val.to(params[4])
            new_dq.meta["val"] = val
        for n in (q, new_dq):
            for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
                if key in node.meta:
                    n.meta[key] = node.meta[key]
        node.replace_input_with(x, new_dq)
        done += 1
    if done:
        graph.lint()
        gm.recompile()
    return done


__all__ = ["PASSTHROUGH", "requantize_passthrough"]
