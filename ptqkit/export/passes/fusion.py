"""The passes that reshape the exported QDQ graph so that ONNX Runtime's fusions fire
(``DQ → op → Q`` ⇒ integer kernels); each rewrite is exact (see :mod:`ptqkit.export.passes`)."""

from __future__ import annotations

import numpy as np
from onnx import helper

from ..graph import DQ, SELECT_OPS, VALUE_OPS, Graph, Q, rewire, same_qparams, zero_pad
from .registry import register_pass


@register_pass("inline_identities")
def inline_identities(g: Graph) -> int:
    """``Identity`` of an initializer (the exporter's way of sharing one) → the initializer."""
    done = 0
    for n in list(g.nodes):
        if n.op_type == "Identity" and n.input[0] in g.inits and n.output[0] not in g.outputs:
            rewire(g, n.output[0], n.input[0])
            g.nodes.remove(n)
            done += 1
    return done


@register_pass("scalar_qparams")
def scalar_qparams(g: Graph) -> int:
    """Per-tensor scale/zero point of shape ``[1]`` → rank-0 initializers.

    ONNX Runtime treats ``[1]`` as per-tensor in its kernels, but its checks for a redundant
    ``Relu``/``Clip`` before ``Q`` (and so the fusion of ``Conv → ReLU6 → Q``) want rank 0.
    """
    done, made = 0, {}
    for n in g.nodes:
        if n.op_type not in (Q, DQ):
            continue
        prefix = n.name.strip("/").rsplit("/", 1)[0] if "/" in n.name.strip("/") else n.name
        for k, kind in ((1, "scale"), (2, "zero_point")):
            v = g.const(n.input[k]) if k < len(n.input) else None
            if v is None or v.shape != (1,):
                continue
            key = (prefix, n.input[k])
            if key not in made:
                made[key] = g.add_init(v.reshape(()), f"{prefix.replace('/', '.')}.{kind}")
            n.input[k] = made[key]
            done += 1
    return done


@register_pass("uint8_activations")
def uint8_activations(g: Graph) -> int:
    """Activation ``Q``/``DQ`` on the signed grid (``int8``, zero point ``z``) → ``uint8`` with
    zero point ``z + 128``: the same real values, rounding and saturation (the grid is shifted by
    an integer). ONNX Runtime's x86 kernels take ``uint8`` activations with ``int8`` weights
    (``QLinearConv`` is not fused for ``int8`` activations there)."""
    done, made = 0, {}
    for n in g.nodes:
        if n.op_type not in (Q, DQ) or len(n.input) < 3 or g.const(n.input[0]) is not None:
            continue
        z = g.const(n.input[2])
        if z is None or z.dtype != np.int8:
            continue
        name = n.input[2]
        if name not in made:
            u8 = (z.astype(np.int16) + 128).astype(np.uint8)
            readers = g.users.get(name, [])
            activation = [r.op_type in (Q, DQ) and g.const(r.input[0]) is None for r in readers]
            if name in g.inits and all(activation):
                g.set_init(name, u8)  # only activation Q/DQ read it: change it in place
                made[name] = name
            else:
                made[name] = g.add_init(u8, name + "_u8")
        n.input[2] = made[name]
        done += 1
    return done


#: ops evaluated ahead of time when all their inputs are constant (never Q/DQ: weights stay int)
FOLDABLE = {
    "Cast",
    "Concat",
    "ConstantOfShape",
    "Reshape",
    "Slice",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Gather",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Neg",
    "Range",
    "Equal",
    "Where",
    "Expand",
    "Constant",
}


@register_pass("fold_constants")
def fold_constants(g: Graph) -> int:
    """Evaluate nodes of :data:`FOLDABLE` type whose inputs are all constant (shape arithmetic
    the exporter leaves behind, e.g. the ``pads`` of ``F.pad``) into initializers."""
    from onnx.reference import ReferenceEvaluator

    done = 0
    for n in list(g.nodes):
        if n.op_type not in FOLDABLE or any(o in g.outputs for o in n.output):
            continue
        inputs = [g.const(i) if i else None for i in n.input]
        if any(v is None for i, v in zip(n.input, inputs) if i):
            continue
        if n.op_type == "Constant" and n.attribute[0].name != "value":
            continue
        try:
            feeds = {i: v for i, v in zip(n.input, inputs) if i}
            sub = helper.make_graph(
                [n], "fold", [helper.make_tensor_value_info(i, 0, None) for i in feeds], []
            )
            sub.output.extend(helper.make_tensor_value_info(o, 0, None) for o in n.output)
            opset = [o for o in g.model.opset_import if o.domain in ("", "ai.onnx")]
            res = ReferenceEvaluator(helper.make_model(sub, opset_imports=opset)).run(None, feeds)
        except Exception:  # anything the reference evaluator cannot do stays a node
            continue
        for o, v in zip(n.output, res):
            g.set_init(o, np.asarray(v))
        g.nodes.remove(n)
        done += 1
        g.reindex()
    return done


@register_pass("transpose_weights")
def transpose_weights(g: Graph) -> int:
    """``DQ(int weight, axis) → Transpose(perm)`` → ``DQ(transposed weight, perm.index(axis))``
    (``nn.Linear`` on a 3-D input exports as ``MatMul`` with a transposed weight)."""
    done = 0
    for t in list(g.nodes):
        if t.op_type != "Transpose":
            continue
        dq = g.producer.get(t.input[0])
        w = g.const(dq.input[0]) if dq is not None and dq.op_type == DQ else None
        if dq is None or w is None or w.dtype.kind not in "iu":
            continue
        if g.only_user(dq.output[0]) is not t:
            continue
        perm = g.attr(t, "perm", list(range(w.ndim))[::-1])
        axis = g.attr(dq, "axis", 1) % w.ndim
        dq.input[0] = g.add_init(np.ascontiguousarray(w.transpose(perm)), dq.input[0] + "_T")
        for a in list(dq.attribute):
            if a.name == "axis":
                dq.attribute.remove(a)
        dq.attribute.append(helper.make_attribute("axis", list(perm).index(axis)))
        rewire(g, t.output[0], dq.output[0])
        g.nodes.remove(t)
        done += 1
    return done


@register_pass("hoist_quantize")
def hoist_quantize(g: Graph) -> int:
    """``X → V → Q`` (``V`` value-preserving, all of ``V``'s readers are ``Q`` with the same
    parameters, ``X`` not a ``DQ``) → ``X → Q → DQ → V → Q``: exact, since ``Q`` commutes with
    ``V`` and ``Q∘DQ∘Q = Q``; ``X`` then has a ``Q`` after it and can run as an integer kernel."""
    done = 0
    changed = True
    while changed:
        changed = False
        for v in list(g.nodes):
            if v.op_type not in VALUE_OPS | {"Pad"} or not v.input or len(v.output) != 1:
                continue
            readers = g.users.get(v.output[0], [])
            if not readers or v.output[0] in g.outputs or any(r.op_type != Q for r in readers):
                continue
            first = g.qparams(readers[0])
            if first is None or not all(same_qparams(g.qparams(r), first) for r in readers[1:]):
                continue
            x = g.producer.get(v.input[0])
            if x is None or x.op_type in (Q, DQ) or x.op_type == "Constant":
                continue
            x_out = v.input[0]
            if v.op_type == "Pad" and not zero_pad(g, v):
                continue
            v.input[0] = g.add_qdq(x_out, readers[0], x_out.strip("/") + "_hoist")
            # a Shape of X reads the same shape from the DQ: X's only reader becomes the Q
            rewire(g, x_out, v.input[0], [r for r in g.users[x_out] if r.op_type == "Shape"])
            g.reindex()
            done += 1
            changed = True
    return done


@register_pass("requantize_passthrough")
def requantize_passthrough(g: Graph) -> int:
    """``DQ(s, z) → S`` (``S`` only selects values, or pads with 0) read by anything but a ``Q``
    with the same parameters → ``DQ → S → Q(s, z) → DQ(s, z)``: exact (the values are on the grid
    already), and it gives ``S`` and its readers the ``DQ``/``Q`` their integer kernels need."""
    done = 0
    changed = True
    while changed:
        changed = False
        for s in list(g.nodes):
            if s.op_type not in SELECT_OPS or not s.input or len(s.output) != 1:
                continue
            dq = g.producer.get(s.input[0])
            if dq is None or dq.op_type != DQ or g.qparams(dq) is None:
                continue
            if s.op_type == "Pad" and not zero_pad(g, s):
                continue
            out = s.output[0]
            params = g.qparams(dq)
            others = [
                r
                for r in g.users.get(out, [])
                if not (r.op_type == Q and same_qparams(g.qparams(r), params))
            ]
            if not others:
                continue
            new = g.add_qdq(out, dq, out.strip("/") + "_requant")
            rewire(g, out, new, others)
            g.reindex()
            done += 1
            changed = True
    return done


@register_pass("fold_pad_into_conv")
def fold_pad_into_conv(g: Graph) -> int:
    """``Pad(constant 0, spatial dims only) → Conv`` → ``Conv`` with larger ``pads`` (also with a
    ``Q → DQ`` between them that repeats the parameters of the ``DQ`` feeding the ``Pad``)."""
    done = 0
    for pad in list(g.nodes):
        if pad.op_type != "Pad" or g.attr(pad, "mode", "constant") != "constant":
            continue
        chain, conv = [pad], g.only_user(pad.output[0])
        if conv is not None and conv.op_type == Q:  # DQ(s,z) → Pad → Q(s,z) → DQ → Conv
            src = g.producer.get(pad.input[0])
            dq = g.only_user(conv.output[0])
            if src is None or not same_qparams(g.qparams(src), g.qparams(conv)) or dq is None:
                continue
            chain, conv = [pad, conv, dq], g.only_user(dq.output[0])
        if conv is None or conv.op_type != "Conv" or conv.input[0] != chain[-1].output[0]:
            continue
        if g.attr(conv, "auto_pad", "NOTSET") != "NOTSET":
            continue
        pads_c = g.const(pad.input[1]) if len(pad.input) > 1 else None
        value = g.const(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
        if pads_c is None or value is None or np.any(value != 0) or len(pad.input) > 3:
            continue
        pads = [int(p) for p in pads_c.reshape(-1)]
        rank = len(pads) // 2
        begin, end = pads[:rank], pads[rank:]
        if rank < 3 or any(begin[:2]) or any(end[:2]) or min(pads) < 0:
            continue
        old = g.attr(conv, "pads", [0] * (2 * (rank - 2)))
        new = [a + b for a, b in zip(old, begin[2:] + end[2:])]
        for a in list(conv.attribute):
            if a.name == "pads":
                conv.attribute.remove(a)
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        for n in chain:
            g.nodes.remove(n)
        g.reindex()
        done += 1
    return done
