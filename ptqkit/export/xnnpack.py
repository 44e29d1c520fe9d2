"""The XNNPACK form of an :func:`~ptqkit.export.pt2.export_pt2` program, and a structural check
of its Q/DQ against the pattern ExecuTorch's ``XNNPACKQuantizer`` emits (no executorch needed).

``XNNPACKQuantizer(get_symmetric_quantization_config(is_per_channel=True))`` + ``convert_pt2e``
writes, around every conv/linear: ``dequantize_per_tensor(q, s, z, -128, 127, int8)`` on the
input (asymmetric **signed** int8 activations), ``dequantize_per_channel(w, s_w, 0, axis 0,
-127, 127, int8)`` on the weight (symmetric per-channel int8), a float bias, and a
``quantize_per_tensor(·, int8)`` after the layer (or after the ReLU/ReLU6 it fuses). XNNPACK's
partitioner only takes ``int8``/``qint8``/``quint8`` Q/DQ (``torch.uint8`` is not among the
dtypes it accepts) and runs a static qs8 conv/fully-connected only when its output is quantized
again.

Two exact rewrites (:func:`xnnpack_program`) make ptqkit's program match:

* **signed activations**: ptqkit's asymmetric grid ``[0, 255]`` in ``uint8`` with zero point
  ``z`` becomes ``[-128, 127]`` in ``int8`` with zero point ``z - 128``. The same real values:
  ``(q - z)·s = ((q - 128) - (z - 128))·s``, and ``clamp(round(x/s) + z, 0, 255) - 128 =
  clamp(round(x/s) + z - 128, -128, 127)``.
* **float weights where the output stays float**: a conv/linear whose output reaches no
  quantize (the network's last Linear, whose logits ptqkit leaves in float) cannot be a qs8
  kernel in XNNPACK; given ``DQ(w_int8)`` there ExecuTorch 1.5's partitioner hands the integer
  weight to a float fully-connected as if it were float (measured: logits off by ~550). Its
  weight becomes the float constant ``(w_q - z_w)·s_w``, the simulation's own weight, so it runs
  an exact float kernel and is counted as float.

* **one grid per concat**: XNNPACK's qs8 concatenate needs every input on its output's grid
  (``XNNPACKQuantizer`` shares one observer between them) and refuses the program at load time
  otherwise (``xnn_status_invalid_parameter``). ptqkit quantizes each branch on its own and the
  concat's output once: ``Q_o(cat(DQ_1(q_1), DQ_2(q_2)))``; each input gets ``Q_o → DQ_o``, the
  same numbers, since quantizing is elementwise: ``Q_o(cat(a, b)) = cat(Q_o(a), Q_o(b))``.

Refused (:class:`~ptqkit.errors.ExportError`): activation grids of other than 8 bits (XNNPACK
saturates to the full int8 range, not ``[qmin, qmax]``) and per-channel activation grids
(XNNPACK quantizes activations per tensor).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ExportError
from .pt2.modules import qd_ops
from .pt2.program import LAYER_OPS

#: ops XNNPACK fuses into the conv/linear before them (the quantize may follow them)
FUSED = ("relu", "relu_", "hardtanh", "hardtanh_", "clamp", "relu6")


def _name(node: Any) -> str:
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return ""
    return str(getattr(node.target, "__name__", node.target)).split(".")[0]


def _quantized_output(node: torch.fx.Node) -> bool:
    """Whether ``node``'s output (or that of the fused activation after it) is only quantized."""
    users = list(node.users)
    if len(users) == 1 and _name(users[0]) in FUSED:
        users = list(users[0].users)
    return bool(users) and all(_name(u) == "quantize_per_tensor" for u in users)


def _attr(gm: torch.fx.GraphModule, node: Any) -> Any:
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj
    return node


def _signed_activations(gm: torch.fx.GraphModule) -> int:
    """uint8 per-tensor Q/DQ → int8 with ``z - 128`` (exact); returns the number rewritten."""
    ops, done = qd_ops(), 0
    per_tensor = (ops.quantize_per_tensor.default, ops.dequantize_per_tensor.default)
    per_channel = (ops.quantize_per_channel.default, ops.dequantize_per_channel.default)
    for node in gm.graph.nodes:
        if node.target in per_channel and node.args[-1] != torch.int8:
            raise ExportError(
                f"{node.name}: a per-channel activation grid; XNNPACK quantizes activations "
                "per tensor (quantize with activations=QuantSpec(per_channel=False))"
            )
        if node.target not in per_tensor:
            continue
        x, s, z, lo, hi, dtype = node.args[:6]
        if (lo, hi) not in ((0, 255), (-128, 127)):
            raise ExportError(
                f"{node.name}: a [{lo}, {hi}] activation grid; XNNPACK's int8 kernels saturate "
                "to the full 8-bit range, so only 8-bit activations are exported for it"
            )
        if dtype == torch.uint8:
            node.args = (x, s, int(z) - 128, -128, 127, torch.int8, *node.args[6:])
            done += 1
    return done


def _float_weights(gm: torch.fx.GraphModule) -> list[str]:
    """Conv/linear nodes with ``DQ(w_int)`` weights and a float output get the dequantized
    weight as a float constant; returns their names."""
    done: list[str] = []
    for node in list(gm.graph.nodes):
        if _name(node) not in LAYER_OPS or len(node.args) < 2 or _quantized_output(node):
            continue
        w: Any = node.args[1]
        if _name(w) not in ("dequantize_per_channel", "dequantize_per_tensor"):
            continue
        args = [_attr(gm, a) for a in w.args]
        kwargs = {k: _attr(gm, v) for k, v in w.kwargs.items()}
        value = w.target(*args, **kwargs)
        attr = f"_xnnpack_float_weight_{len(done)}"
        gm.register_buffer(attr, value.detach().clone())
        with gm.graph.inserting_before(node):
            const = gm.graph.get_attr(attr)
        const.meta["val"] = w.meta.get("val")
        node.replace_input_with(w, const)
        done.append(node.name)
    gm.graph.eliminate_dead_code()
    return done


def _cat_on_one_grid(gm: torch.fx.GraphModule) -> int:
    """``cat`` of per-tensor DQs whose users all quantize with one grid: each input DQ gets
    ``Q → DQ`` on that grid (exact, see the module docstring); returns the inputs requantized."""
    ops, done = qd_ops(), 0
    q_op, dq_op = ops.quantize_per_tensor.default, ops.dequantize_per_tensor.default
    for node in list(gm.graph.nodes):
        if _name(node) != "cat" or not node.users:
            continue
        grids = {tuple(u.args[1:6]) if u.target is q_op else None for u in node.users}
        inputs = node.args[0]
        if (
            len(grids) != 1
            or None in grids
            or not all(isinstance(x, torch.fx.Node) and x.target is dq_op for x in inputs)
        ):
            continue
        grid: tuple = grids.pop()  # type: ignore[assignment]
        for x in inputs:
            if tuple(x.args[1:6]) == grid:
                continue
            with gm.graph.inserting_before(node):
                q = gm.graph.call_function(q_op, (x, *grid))
                dq = gm.graph.call_function(dq_op, (q, *grid), dict(x.kwargs))
            node.replace_input_with(x, dq)
            done += 1
    return done


def xnnpack_program(
    program: torch.export.ExportedProgram, *, max_batch: int | None = None
) -> tuple[torch.export.ExportedProgram, list[str]]:
    """``program`` (from :func:`~ptqkit.export.pt2.export_pt2`) rewritten for XNNPACK (see the
    module docstring) and exported again, with a dynamic batch dimension when the program has
    one (``max_batch``: its upper bound, for ExecuTorch's memory planning). Returns the program
    and the names of the conv/linear nodes given float weights. The outputs are unchanged."""
    qd_ops()
    gm = program.module()
    _signed_activations(gm)
    _cat_on_one_grid(gm)
    floated = _float_weights(gm)
    gm.graph.lint()
    gm.recompile()
    args, kwargs = program.example_inputs or ((), {})
    if kwargs or not args:
        raise ExportError("the program holds no positional example inputs to export it again")
    shapes = None
    if any(_dynamic_batch(v) for v in _input_vals(program)):
        batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch else None
        batch = batch or torch.export.Dim("batch", min=1)
        shapes = tuple({0: batch} for _ in args)
    try:
        with torch.no_grad():
            new = torch.export.export(gm, tuple(args), dynamic_shapes=shapes, strict=False)
    except Exception as e:
        raise ExportError(f"torch.export of the XNNPACK form failed: {e}".split("\n")[0]) from e
    return new, floated


def _input_vals(program: torch.export.ExportedProgram) -> list[Any]:
    users = {s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"}
    return [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"
            and n.name in users]  # fmt: skip


def _dynamic_batch(val: Any) -> bool:
    return isinstance(val, torch.Tensor) and val.dim() > 0 and not isinstance(val.shape[0], int)


# -- the structural check ------------------------------------------------------------------------
def _qdq_args(node: torch.fx.Node) -> tuple:
    """``(quant_min, quant_max, dtype)`` of a Q/DQ node (per tensor: args 3..5; per channel:
    args 4..6, after the axis)."""
    start = 4 if _name(node).endswith("per_channel") else 3
    return tuple(node.args[start : start + 3])


def xnnpack_violations(program: torch.export.ExportedProgram) -> list[str]:
    """Where ``program`` departs from the pattern ``XNNPACKQuantizer`` emits (per-channel
    symmetric config), one line per place; empty when every conv/linear with an integer weight
    has: an int8 per-tensor DQ input, an int8 zero-point-0 weight DQ (per channel on axis 0, or
    per tensor), a float bias, and a quantized output unless its weight is float; every concat
    has its inputs and output on one grid; and no Q/DQ uses another dtype than int8."""
    out: list[str] = []
    qd = ("quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel",
          "dequantize_per_channel")  # fmt: skip
    for node in program.graph.nodes:
        if _name(node) in qd and _qdq_args(node)[2] != torch.int8:
            out.append(f"{node.name}: {_qdq_args(node)[2]} (XNNPACK takes int8 Q/DQ)")
        if _name(node) in LAYER_OPS:
            out += _layer_violations(program, node)
        if _name(node) == "cat":
            grids = {tuple(x.args[1:6]) for x in node.args[0] if isinstance(x, torch.fx.Node)}
            grids |= {tuple(u.args[1:6]) for u in node.users if _name(u).startswith("quantize")}
            if len(grids) > 1:
                out.append(f"{node.name}: inputs and output on {len(grids)} grids (XNNPACK: one)")
    return out


def _layer_violations(program: torch.export.ExportedProgram, node: torch.fx.Node) -> list[str]:
    x: Any = node.args[0]
    w: Any = node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    if _name(w) not in ("dequantize_per_channel", "dequantize_per_tensor"):
        return []  # a float layer: XNNPACK runs it in fp32, nothing to match
    out = []
    if _name(x) != "dequantize_per_tensor" or _qdq_args(x) != (-128, 127, torch.int8):
        out.append(f"{node.name}: input is not DQ per tensor int8 [-128, 127]")
    zp = _constant(program, w.args[2])
    if _name(w) == "dequantize_per_channel" and w.args[3] != 0:
        out.append(f"{node.name}: weight DQ on axis {w.args[3]}, not 0 (output channels)")
    if zp is None or torch.as_tensor(zp).any():
        out.append(f"{node.name}: weight zero point is not 0 (symmetric weights)")
    if isinstance(b, torch.fx.Node) and _name(b).startswith("dequantize"):
        out.append(f"{node.name}: quantized bias (XNNPACK's pattern keeps it float)")
    if not _quantized_output(node):
        out.append(f"{node.name}: int8 weight but float output (XNNPACK needs a Q after it)")
    return out


def _constant(program: torch.export.ExportedProgram, arg: Any) -> Any:
    if not isinstance(arg, torch.fx.Node):
        return arg
    sig = program.graph_signature
    target = sig.inputs_to_buffers.get(arg.name) or sig.inputs_to_lifted_tensor_constants.get(
        arg.name
    )
    if target is None:
        return None
    return program.state_dict.get(target, program.constants.get(target))


__all__ = ["FUSED", "xnnpack_program", "xnnpack_violations"]
