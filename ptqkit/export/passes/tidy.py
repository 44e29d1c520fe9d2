"""The last passes: short tensor names, one copy of identical small constants, and no node or
initializer that nobody reads."""

from __future__ import annotations

from onnx import numpy_helper

from ..graph import DQ, Graph, Q, rewire
from .registry import register_pass


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
                    rewire(g, o, new)
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
        rewire(g, n.output[0], new)
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
