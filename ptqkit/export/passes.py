"""Post-processing of the exported ONNX graph so that ONNX Runtime runs it on integer kernels.

The TorchScript exporter emits a correct QDQ graph, but one whose shape keeps ONNX Runtime's
QDQ fusions (``DQ → op → Q`` ⇒ ``QLinearConv`` / ``QGemm`` / ``QLinearAdd`` ...) from firing.
Each pass below rewrites one such pattern into an equivalent one; every rewrite is *exact*: the
graph computes the same numbers before and after (or, for the int32 bias, the numbers an integer
kernel computes anyway). Passes run in registry order; adding a rule is one
:func:`register_pass` entry.

==========================  ====================================================================
pass                        rewrite
==========================  ====================================================================
``inline_identities``       ``Identity(initializer)`` → the initializer itself
``scalar_qparams``          per-tensor Q/DQ scale and zero point of shape ``[1]`` → rank 0
                            (ORT only drops a Relu/Clip before ``Q``, and so fuses ``Conv →
                            ReLU6 → Q`` or ``Add → ReLU → Q``, with rank-0 parameters)
``uint8_activations``       signed activation grid (int8, zero point ``z``) → uint8 with
                            ``z + 128``: the same values (ORT's x86 ``QLinearConv`` wants uint8)
``fold_constants``          constant sub-graphs (the shape arithmetic of ``F.pad``) → initializers
``transpose_weights``       ``DQ(int W) → Transpose`` → ``DQ(int Wᵀ, axis permuted)``
``hoist_quantize``          ``X → Flatten/Reshape/MaxPool/Pad… → Q`` → ``X → Q → DQ → … → Q``
                            (``Q`` commutes with value-preserving ops: ``X`` gets its integer
                            kernel, e.g. ``QLinearGlobalAveragePool``)
``requantize_passthrough``  ``DQ → MaxPool/Flatten/Reshape/Pad… → op`` → ``… → Q → DQ → op``
                            (the values are on the grid already: ``Q∘DQ`` is the identity on them)
``fold_pad_into_conv``      ``Pad(constant 0) → Conv`` → ``Conv(pads += ...)`` (a conv pads with
                            real 0, which is the zero point: exact)
``bias_to_int32``           float bias of ``Conv``/``Gemm``/``MatMul+Add`` fed by ``DQ(x)`` and
                            ``DQ(W)`` → ``DQ(int32, scale = s_x·s_w, zero point 0)``
``tidy_names``              short tensor names (``aq_r1.q``, ``conv1.weight``, ``/conv1/Conv``)
``share_constants``         identical small initializers (zero points, scales) → one
``prune``                   nodes whose outputs nobody reads, initializers nobody uses
==========================  ====================================================================
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ExportError, PTQWarning

Q, DQ = "QuantizeLinear", "DequantizeLinear"
INT32_MAX = 2**31 - 1

#: ops whose output holds only values of their (first) input, element for element
VALUE_OPS = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "MaxPool"}
#: ops that also only select / repeat values of their input (or pad with real 0)
SELECT_OPS = VALUE_OPS | {"Slice", "Gather", "Expand", "Tile", "Pad"}


# -- a small graph view ------------------------------------------------------------------------
@dataclass
class Graph:
    """An ``onnx.ModelProto`` with producer/consumer indices. Passes edit ``nodes`` (a plain list,
    kept in any order: :meth:`finish` sorts it) and call :meth:`reindex` after structural edits."""

    model: onnx.ModelProto
    nodes: list[onnx.NodeProto] = field(init=False)
    inits: dict[str, onnx.TensorProto] = field(init=False)

    def __post_init__(self) -> None:
        self.nodes = list(self.model.graph.node)
        self.inits = {t.name: t for t in self.model.graph.initializer}
        self._names: set[str] = set()
        self.reindex()

    def reindex(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                self.users.setdefault(i, []).append(n)
        self._names |= set(self.producer) | set(self.inits) | {n.name for n in self.nodes}
        self.outputs = {o.name for o in self.model.graph.output}

    def fresh(self, hint: str) -> str:
        """A tensor/node name not used yet, derived from ``hint``."""
        name, i = hint, 1
        while name in self._names:
            name, i = f"{hint}_{i}", i + 1
        self._names.add(name)
        return name

    def const(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is an initializer or a ``Constant`` output, else ``None``."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant" and n.attribute[0].name == "value":
            return numpy_helper.to_array(n.attribute[0].t)
        return None

    def add_init(self, value: np.ndarray, hint: str) -> str:
        name = self.fresh(hint)
        self.inits[name] = numpy_helper.from_array(np.asarray(value), name)
        return name

    def set_init(self, name: str, value: np.ndarray) -> None:
        self.inits[name] = numpy_helper.from_array(np.asarray(value), name)

    def only_user(self, name: str) -> onnx.NodeProto | None:
        users = self.users.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def attr(self, node: onnx.NodeProto, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                v = helper.get_attribute_value(a)
                return v.decode() if isinstance(v, bytes) else v
        return default

    def qparams(self, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
        """Constant ``(scale, zero_point)`` of a per-tensor Q/DQ node, else ``None``."""
        if node.op_type not in (Q, DQ) or len(node.input) < 3:
            return None
        s, z = self.const(node.input[1]), self.const(node.input[2])
        if s is None or z is None or s.size != 1 or z.size != 1:
            return None
        return s, z

    def add_qdq(self, tensor: str, q_like: onnx.NodeProto, hint: str) -> str:
        """Insert ``Q → DQ`` on ``tensor`` with the scale/zero point inputs of ``q_like``;
        returns the dequantized tensor's name (the caller rewires consumers)."""
        scale, zp = q_like.input[1], q_like.input[2]
        q_out, dq_out = self.fresh(f"{hint}_q"), self.fresh(f"{hint}_dq")
        self.nodes.append(helper.make_node(Q, [tensor, scale, zp], [q_out], self.fresh(q_out)))
        self.nodes.append(helper.make_node(DQ, [q_out, scale, zp], [dq_out], self.fresh(dq_out)))
        return dq_out

    def finish(self) -> onnx.ModelProto:
        """Write nodes (topologically sorted) and initializers back into the model."""
        available = set(self.inits) | {i.name for i in self.model.graph.input} | {""}
        pending, ordered = list(self.nodes), []
        while pending:
            ready = [n for n in pending if all(i in available for i in n.input)]
            if not ready:
                names = [n.name or n.op_type for n in pending[:5]]
                raise RuntimeError(f"graph has a cycle or a missing input near {names}")
            ready_ids = {id(n) for n in ready}
            pending = [n for n in pending if id(n) not in ready_ids]
            ordered += ready
            available.update(o for n in ready for o in n.output)
        g = self.model.graph
        del g.node[:]
        g.node.extend(ordered)
        del g.initializer[:]
        g.initializer.extend(self.inits.values())
        return self.model


def _same(a: tuple | None, b: tuple | None) -> bool:
    """Two ``(scale, zero_point)`` pairs are equal (values and zero-point dtype)."""
    if a is None or b is None:
        return False
    return bool((a[0] == b[0]).all() and (a[1] == b[1]).all() and a[1].dtype == b[1].dtype)


def _zero_pad(g: Graph, pad: onnx.NodeProto) -> bool:
    """A ``Pad`` that pads with real 0 (constant mode) or repeats values (edge, reflect)."""
    if g.attr(pad, "mode", "constant") != "constant":
        return True
    value = g.const(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
    return value is not None and not np.any(value != 0)


def _rewire(g: Graph, old: str, new: str, only: list[onnx.NodeProto] | None = None) -> None:
    """Make the consumers of ``old`` (or just ``only``) read ``new`` instead."""
    for n in only if only is not None else list(g.users.get(old, [])):
        for k, name in enumerate(n.input):
            if name == old:
                n.input[k] = new


# -- the registry ------------------------------------------------------------------------------
PassFn = Callable[[Graph], int]
#: name → pass; each pass returns how many rewrites it made
PASSES: dict[str, PassFn] = {}


def register_pass(name: str) -> Callable[[PassFn], PassFn]:
    """Register a graph pass under ``name`` (run after the ones registered before it)."""

    def deco(fn: PassFn) -> PassFn:
        PASSES[name] = fn
        return fn

    return deco


def run_passes(model: onnx.ModelProto, names: list[str] | None = None) -> dict[str, int]:
    """Apply the passes ``names`` (default: all, in registry order) to ``model`` in place;
    returns the number of rewrites per pass."""
    g = Graph(model)
    counts = {}
    for name in names if names is not None else list(PASSES):
        try:
            counts[name] = PASSES[name](g)
        except Exception as e:  # a bug in a pass: say which one, not a deep traceback
            raise ExportError(f"ONNX graph pass {name!r} failed: {type(e).__name__}: {e}") from e
        g.reindex()
    g.finish()
    return counts


# -- passes ------------------------------------------------------------------------------------
@register_pass("inline_identities")
def inline_identities(g: Graph) -> int:
    """``Identity`` of an initializer (the exporter's way of sharing one) → the initializer."""
    done = 0
    for n in list(g.nodes):
        if n.op_type == "Identity" and n.input[0] in g.inits and n.output[0] not in g.outputs:
            _rewire(g, n.output[0], n.input[0])
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
        if w is None or g.only_user(dq.output[0]) is not t or w.dtype.kind not in "iu":
            continue
        perm = g.attr(t, "perm", list(range(w.ndim))[::-1])
        axis = g.attr(dq, "axis", 1) % w.ndim
        dq.input[0] = g.add_init(np.ascontiguousarray(w.transpose(perm)), dq.input[0] + "_T")
        for a in list(dq.attribute):
            if a.name == "axis":
                dq.attribute.remove(a)
        dq.attribute.append(helper.make_attribute("axis", list(perm).index(axis)))
        _rewire(g, t.output[0], dq.output[0])
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
            if first is None or not all(_same(g.qparams(r), first) for r in readers[1:]):
                continue
            x = g.producer.get(v.input[0])
            if x is None or x.op_type in (Q, DQ) or x.op_type == "Constant":
                continue
            x_out = v.input[0]
            if v.op_type == "Pad" and not _zero_pad(g, v):
                continue
            v.input[0] = g.add_qdq(x_out, readers[0], x_out.strip("/") + "_hoist")
            # a Shape of X reads the same shape from the DQ: X's only reader becomes the Q
            _rewire(g, x_out, v.input[0], [r for r in g.users[x_out] if r.op_type == "Shape"])
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
            if s.op_type == "Pad" and not _zero_pad(g, s):
                continue
            out = s.output[0]
            params = g.qparams(dq)
            others = [
                r
                for r in g.users.get(out, [])
                if not (r.op_type == Q and _same(g.qparams(r), params))
            ]
            if not others:
                continue
            new = g.add_qdq(out, dq, out.strip("/") + "_requant")
            _rewire(g, out, new, others)
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
            if src is None or not _same(g.qparams(src), g.qparams(conv)) or dq is None:
                continue
            chain, conv = [pad, conv, dq], g.only_user(dq.output[0])
        if conv is None or conv.op_type != "Conv" or conv.input[0] != chain[-1].output[0]:
            continue
        if g.attr(conv, "auto_pad", "NOTSET") != "NOTSET":
            continue
        pads = g.const(pad.input[1]) if len(pad.input) > 1 else None
        value = g.const(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
        if pads is None or value is None or np.any(value != 0) or len(pad.input) > 3:
            continue
        pads = [int(p) for p in pads.reshape(-1)]
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


def _bias_scale(g: Graph, x_dq, w_dq, nout: int, axis: int) -> tuple[float, np.ndarray] | None:
    """``(s_x, s_w)`` with ``s_w`` a float32 vector of ``nout`` channels, when the input and the
    weight come from constant ``DQ`` nodes and the weight's channel axis is ``axis``."""
    sx = g.qparams(x_dq) if x_dq is not None and x_dq.op_type == DQ else None
    w = g.const(w_dq.input[0]) if w_dq is not None and w_dq.op_type == DQ else None
    sw = g.const(w_dq.input[1]) if w is not None else None
    if sx is None or sw is None or w.dtype.kind not in "iu":
        return None
    if sw.size != 1 and (g.attr(w_dq, "axis", 1) % w.ndim != axis or sw.size != nout):
        return None
    return float(sx[0].reshape(())), np.broadcast_to(sw.astype(np.float32).reshape(-1), (nout,))


def _widen_weight_scales(g: Graph, w_dq: onnx.NodeProto, sw: np.ndarray, fix: np.ndarray):
    """Give the channels ``fix`` the scales ``sw[fix]`` (larger than before) and requantize their
    integer weights: ``q' = clamp(round((q - z)·s_old/s_new) + z)``. Returns the new scales."""
    w = g.const(w_dq.input[0])
    old = np.broadcast_to(g.const(w_dq.input[1]).astype(np.float64).reshape(-1), sw.shape)
    zp = g.const(w_dq.input[2]) if len(w_dq.input) > 2 and w_dq.input[2] else np.zeros(1, w.dtype)
    zp = np.broadcast_to(zp.astype(np.float64).reshape(-1), sw.shape)
    axis = g.attr(w_dq, "axis", 1) % w.ndim
    wc = np.moveaxis(w, axis, 0).astype(np.float64).copy()
    ratio = (old / sw.astype(np.float64))[fix].reshape([-1] + [1] * (w.ndim - 1))
    zf = zp[fix].reshape(ratio.shape)
    info = np.iinfo(w.dtype)
    wc[fix] = np.clip(np.rint((wc[fix] - zf) * ratio) + zf, info.min, info.max)
    base = w_dq.input[0].replace("onnx::", "")
    w_dq.input[0] = g.add_init(np.moveaxis(wc, 0, axis).astype(w.dtype), base + "_fit")
    w_dq.input[1] = g.add_init(sw.astype(np.float32), w_dq.input[1].replace("onnx::", "") + "_fit")
    return sw


def _quantize_bias(g: Graph, b: np.ndarray, sx: float, sw: np.ndarray, w_dq, where: str):
    """``(round(b / (s_x·s_w)) as int32, s_x·s_w)``.

    A channel whose bias does not fit in int32 at that scale (a channel with near-zero weights,
    whose weight scale is tiny) gets the weight scale ``|b| / (s_x·2^30)`` and its integer
    weights are requantized to it; the change to the channel's output is at most
    ``K·(2^8-1)·|b|/2^31`` for ``K`` inputs (a relative ``1e-4`` of the bias for ``K = 1000``),
    where clipping the bias would lose it. With per-tensor weight scales the bias is clipped,
    with a warning.
    """
    b = b.astype(np.float64).reshape(-1)
    scale = (np.float32(sx) * sw).astype(np.float32)
    over = np.abs(np.rint(b / scale)) > INT32_MAX
    if over.any() and g.const(w_dq.input[1]).size == len(b) > 1:
        sw = sw.astype(np.float32).copy()
        sw[over] = (np.abs(b[over]) / (sx * 2.0**30)).astype(np.float32)
        sw = _widen_weight_scales(g, w_dq, sw, over)
        scale = (np.float32(sx) * sw).astype(np.float32)
        over = np.abs(np.rint(b / scale)) > INT32_MAX
    if over.any():
        warnings.warn(
            f"{where}: the bias of {int(over.sum())} channel(s) exceeds the int32 range of "
            "s_in·s_w and is clipped (per-tensor weight scale too small for the bias)",
            PTQWarning,
            stacklevel=3,
        )
    q = np.clip(np.rint(b / scale.astype(np.float64)), -INT32_MAX, INT32_MAX)
    return q.astype(np.int32), scale


def _set_bias(g: Graph, node: onnx.NodeProto, k: int, b, scales, w_dq, shape) -> None:
    q, s = _quantize_bias(g, b, *scales, w_dq, node.name or node.op_type)
    base = node.input[k].replace("onnx::", "").strip("/")
    qi = g.add_init(q.reshape(shape), base + "_int32")
    si = g.add_init(s, base + "_scale")
    out = g.fresh(base + "_dq")  # no zero point input: 0 is the default
    g.nodes.append(helper.make_node(DQ, [qi, si], [out], g.fresh(out), axis=0))
    node.input[k] = out


@register_pass("bias_to_int32")
def bias_to_int32(g: Graph) -> int:
    """Float bias → ``DQ(int32 initializer, s_x·s_w per channel, zero point 0)`` for ``Conv``,
    ``Gemm`` and ``MatMul → Add`` whose input and weight come from ``DQ`` nodes."""
    done = 0
    for n in list(g.nodes):
        if n.op_type == "Conv" and len(n.input) > 2 and n.input[2]:
            b, w_dq = g.const(n.input[2]), g.producer.get(n.input[1])
            if b is None or b.dtype.kind != "f":
                continue
            s = _bias_scale(g, g.producer.get(n.input[0]), w_dq, b.size, 0)
            if s is not None:
                _set_bias(g, n, 2, b, s, w_dq, b.shape)
                done += 1
        elif n.op_type == "Gemm" and len(n.input) > 2 and n.input[2]:
            b, w_dq = g.const(n.input[2]), g.producer.get(n.input[1])
            if b is None or b.dtype.kind != "f" or g.attr(n, "beta", 1.0) != 1.0:
                continue
            if g.attr(n, "alpha", 1.0) != 1.0 or g.attr(n, "transA", 0):
                continue
            w = g.const(w_dq.input[0]) if w_dq is not None and w_dq.op_type == DQ else None
            if w is None or w.ndim != 2:
                continue
            axis = 0 if g.attr(n, "transB", 0) else 1
            nout = w.shape[axis]
            if b.size not in (1, nout):
                continue
            s = _bias_scale(g, g.producer.get(n.input[0]), w_dq, nout, axis)
            if s is not None:
                _set_bias(g, n, 2, np.broadcast_to(b.reshape(-1), (nout,)), s, w_dq, (nout,))
                done += 1
        elif n.op_type == "MatMul":
            add = g.only_user(n.output[0])
            w_dq = g.producer.get(n.input[1])
            w = g.const(w_dq.input[0]) if w_dq is not None and w_dq.op_type == DQ else None
            if add is None or add.op_type != "Add" or w is None or w.ndim != 2:
                continue
            k = 1 if add.input[0] == n.output[0] else 0
            b = g.const(add.input[k])
            if b is None or b.dtype.kind != "f" or b.size != w.shape[1] or b.ndim != 1:
                continue
            s = _bias_scale(g, g.producer.get(n.input[0]), w_dq, w.shape[1], 1)
            if s is not None:
                _set_bias(g, add, k, b, s, w_dq, b.shape)
                done += 1
    return done


@register_pass("tidy_names")
def tidy_names(g: Graph) -> int:
    """Short, readable tensor names: ``<quantizer>.q`` / ``<quantizer>.dq`` for activations,
    ``<layer>.weight`` for a dequantized weight, ``<node>`` instead of ``<node>_output_0``
    (the exporter's ``/aq_r1/QuantizeLinear_output_0`` is long, and names are a good part of a
    small model's file)."""
    done = 0
    for n in g.nodes:
        if any(o in g.outputs for o in n.output):
            continue
        if n.op_type not in (Q, DQ):  # "/conv1/Conv_output_0" → "/conv1/Conv"
            for k, o in enumerate(n.output):
                if n.name and o == f"{n.name}_output_{k}":
                    new = n.name if k == 0 else f"{n.name}:{k}"
                    taken = new in g.producer or new in g.inits or new in g.users
                    new = g.fresh(new) if taken else new  # node names are another namespace
                    _rewire(g, o, new)
                    n.output[k] = new
                    done += 1
            continue
        if not n.name.startswith("/"):  # made by a pass: already short
            continue
        scope = n.name.strip("/").rsplit("/", 1)[0] if "/" in n.name.strip("/") else ""
        if not scope:
            continue
        scope = scope.replace("/", ".")
        const = n.input[0] in g.inits
        if const and n.input[0].endswith("_int"):
            hint = n.input[0][: -len("_int")]
        else:
            hint = f"{scope}.{'q' if n.op_type == Q else 'dq'}"
        new = g.fresh(hint)
        _rewire(g, n.output[0], new)
        n.output[0] = new
        n.name = g.fresh(f"{scope}.{n.op_type[:1] if n.op_type == Q else 'DQ'}")
        done += 1
    return done


@register_pass("share_constants")
def share_constants(g: Graph) -> int:
    """Identical small initializers (zero points, scales: at most 64 values) → one."""
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    for name, t in g.inits.items():
        v = numpy_helper.to_array(t)
        if v.size > 64:
            continue
        key = (v.dtype.str, v.shape, v.tobytes())
        if key in first:
            rename[name] = first[key]
        else:
            first[key] = name
    for n in g.nodes:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
    return len(rename)


@register_pass("prune")
def prune(g: Graph) -> int:
    """Drop nodes whose outputs nobody reads and initializers nobody uses."""
    before = len(g.nodes) + len(g.inits)
    changed = True
    while changed:
        g.reindex()
        keep = [n for n in g.nodes if any(o in g.outputs or g.users.get(o) for o in n.output)]
        changed = len(keep) != len(g.nodes)
        g.nodes = keep
    g.reindex()
    used = set(g.users) | g.outputs
    g.inits = {k: v for k, v in g.inits.items() if k in used}
    return before - len(g.nodes) - len(g.inits)
