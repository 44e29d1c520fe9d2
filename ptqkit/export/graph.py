"""A small view of an ONNX graph for the export passes (:mod:`ptqkit.export.passes`): an
``onnx.ModelProto`` with producer/consumer indices (:class:`Graph`), and the few facts about ops
and Q/DQ nodes the passes share (which ops only move values, equal quantization parameters, a
``Pad`` that pads with real 0, rewiring consumers)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

Q, DQ = "QuantizeLinear", "DequantizeLinear"

#: ops whose output holds only values of their (first) input, element for element
VALUE_OPS = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "MaxPool"}
#: ops that also only select / repeat values of their input (or pad with real 0)
SELECT_OPS = VALUE_OPS | {"Slice", "Gather", "Expand", "Tile", "Pad"}


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


def same_qparams(a: tuple | None, b: tuple | None) -> bool:
    """Two ``(scale, zero_point)`` pairs are equal (values and zero-point dtype)."""
    if a is None or b is None:
        return False
    return bool((a[0] == b[0]).all() and (a[1] == b[1]).all() and a[1].dtype == b[1].dtype)


def zero_pad(g: Graph, pad: onnx.NodeProto) -> bool:
    """A ``Pad`` that pads with real 0 (constant mode) or repeats values (edge, reflect)."""
    if g.attr(pad, "mode", "constant") != "constant":
        return True
    value = g.const(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
    return value is not None and not np.any(value != 0)


def rewire(g: Graph, old: str, new: str, only: list[onnx.NodeProto] | None = None) -> None:
    """Make the consumers of ``old`` (or just ``only``) read ``new`` instead."""
    for n in only if only is not None else list(g.users.get(old, [])):
        for k, name in enumerate(n.input):
            if name == old:
                n.input[k] = new


# -- the registry ------------------------------------------------------------------------------


__all__ = ["DQ", "SELECT_OPS", "VALUE_OPS", "Graph", "Q", "rewire", "same_qparams", "zero_pad"]
