"""Replaying the structure later stages add to a prepared model (CLE clamps, SmoothQuant
quantizers) from the data of a file.

Stages after prepare may change the structure: CLE replaces a clipping activation by a
per-channel ``ChannelClamp``, SmoothQuant an input quantizer by a ``SmoothedActQuant``. The file
records (1) every module of one of ptqkit's own structural classes with the attributes needed to
construct it, and (2) the graph's wiring as plain data. Loading constructs those modules only
from the registry below (the file merely selects an entry) and rewires the graph only with
callables found by tracing the caller's architecture: nothing named in a file is imported or
executed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..config import QuantSpec
from ..errors import LoadError


class _Unencodable(Exception):
    pass


def structural_classes() -> dict[str, tuple[type, Any]]:
    """ptqkit's module classes a file may ask for: name -> (class, factory(attrs, tensors))."""
    from ..quant.modules import ActQuant

    out: dict[str, tuple[type, Any]] = {
        "ActQuant": (ActQuant, lambda a, t: ActQuant(QuantSpec.from_dict(a["spec"]), a["label"])),
    }
    with contextlib.suppress(ImportError):
        from ..equalize.cle import ChannelClamp

        out["ChannelClamp"] = (ChannelClamp, lambda a, t: ChannelClamp(t["lo"], t["hi"], a["axis"]))
    with contextlib.suppress(ImportError):
        from ..equalize.smoothquant import SmoothedActQuant

        out["SmoothedActQuant"] = (
            SmoothedActQuant,
            lambda a, t: SmoothedActQuant(
                QuantSpec.from_dict(a["spec"]), a["label"], t["inv_scale"]
            ),
        )
    return out


def structural_modules(qmodel: nn.Module) -> dict[str, dict[str, Any]]:
    from ..quant.modules import ActQuant

    classes = structural_classes()
    out = {}
    for name, m in qmodel.named_modules():
        cls = type(m).__name__
        if cls in classes and type(m) is classes[cls][0]:
            attrs: dict[str, Any] = {"class": cls}
            if isinstance(m, ActQuant):  # SmoothedActQuant too
                attrs.update(spec=m.spec.to_dict(), label=m.label)
            if hasattr(m, "axis") and not hasattr(m, "spec"):
                attrs["axis"] = m.axis
            out[name] = attrs
    return out


def _fn_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', None) or ''}.{getattr(fn, '__qualname__', repr(fn))}"


def _encode(a: Any) -> Any:
    """Node arguments as JSON: node references, containers and plain constants only."""
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    if isinstance(a, (list, tuple)):
        return {"list" if isinstance(a, list) else "tuple": [_encode(x) for x in a]}
    if isinstance(a, dict) and all(isinstance(k, str) for k in a):
        return {"dict": {k: _encode(v) for k, v in a.items()}}
    if isinstance(a, slice):
        return {"slice": [_encode(a.start), _encode(a.stop), _encode(a.step)]}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if a is Ellipsis:
        return {"ellipsis": True}
    raise _Unencodable(type(a).__name__)


def encode_graph(qmodel: nn.Module) -> list[dict[str, Any]] | None:
    if not isinstance(qmodel, fx.GraphModule):
        return None
    nodes = []
    try:
        for n in qmodel.graph.nodes:
            target = _fn_name(n.target) if n.op == "call_function" else n.target
            nodes.append(
                {
                    "name": n.name,
                    "op": n.op,
                    "target": target,
                    "args": _encode(tuple(n.args)),
                    "kwargs": _encode(dict(n.kwargs)),
                }
            )
    except _Unencodable:
        return None  # loading then relies on prepare alone (enough unless a stage rewired)
    return nodes


def _decode(a: Any, nodes: dict[str, fx.Node]) -> Any:
    if not isinstance(a, dict):
        return a
    ((tag, v),) = a.items()
    if tag == "node":
        return nodes[v]
    if tag in ("list", "tuple"):
        items = [_decode(x, nodes) for x in v]
        return items if tag == "list" else tuple(items)
    if tag == "dict":
        return {k: _decode(x, nodes) for k, x in v.items()}
    if tag == "slice":
        return slice(*(_decode(x, nodes) for x in v))
    if tag == "dtype":
        dtype = getattr(torch, v, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {v!r}")
        return dtype
    if tag == "device":
        return torch.device(v)
    if tag == "ellipsis":
        return Ellipsis
    raise ValueError(f"unknown argument tag {tag!r}")


def replay_structure(
    path: Path, qmodel: nn.Module, doc: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """Give the freshly prepared ``qmodel`` the structural modules and wiring of the file."""
    saved_graph, modules = doc.get("graph"), doc.get("modules") or {}
    classes = structural_classes()
    try:
        for name, attrs in modules.items():
            cls = attrs["class"]
            if cls not in classes:
                raise LoadError(f"{path}: module {name} has a class this ptqkit lacks: {cls}")
            existing = _get_submodule(qmodel, name)
            if type(existing) is classes[cls][0]:
                continue
            own = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
            _set_submodule(qmodel, name, classes[cls][1](attrs, own))
        if saved_graph is None or not isinstance(qmodel, fx.GraphModule):
            return
        rebuilt = encode_graph(qmodel)
        if rebuilt == saved_graph:
            return
        _check_same_network(path, qmodel, rebuilt or [], saved_graph, classes)
        _check_same_arguments(path, rebuilt or [], saved_graph)
        functions = {
            _fn_name(n.target): n.target for n in qmodel.graph.nodes if n.op == "call_function"
        }
        methods = {n.target for n in qmodel.graph.nodes if n.op == "call_method"}
        graph = fx.Graph()
        made: dict[str, fx.Node] = {}
        for spec in saved_graph:
            op, target = spec["op"], spec["target"]
            if op == "call_function":
                if target not in functions:
                    raise LoadError(
                        f"{path}: the file calls {target}, which tracing this model does not "
                        "produce; pass the same float architecture that was quantized"
                    )
                target = functions[target]
            elif op == "call_method" and target not in methods:
                raise LoadError(f"{path}: the file calls method {target!r} unknown to this model")
            elif (
                op in ("call_module", "get_attr")
                and _get_submodule(qmodel, target, attr=op == "get_attr") is None
            ):
                raise LoadError(f"{path}: the file uses {target!r}, which this model lacks")
            args = _decode(spec["args"], made)
            kwargs = _decode(spec["kwargs"], made)
            made[spec["name"]] = graph.create_node(op, target, args, kwargs, name=spec["name"])
        graph.lint()
    except LoadError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise LoadError(f"{path}: cannot rebuild the saved structure: {e}") from None
    qmodel.graph = graph
    qmodel.delete_all_unused_submodules()
    qmodel.recompile()


def _check_same_network(
    path: Path,
    qmodel: nn.Module,
    rebuilt: list[dict[str, Any]],
    saved: list[dict[str, Any]],
    classes: dict[str, tuple[type, Any]],
) -> None:
    """The saved wiring may differ from the rebuilt one only by ptqkit's structural modules and by
    clipping activations a stage replaced (CLE's clamps): the same layers, the same functions, the
    same user modules. Anything else means another architecture."""
    from collections import Counter

    from ..graph import ACT_MODULES

    own = tuple(c for c, _ in classes.values())

    def ops(nodes: list[dict[str, Any]]) -> Counter:
        out: Counter = Counter()
        for n in nodes:
            if n["op"] == "call_module":
                m = _get_submodule(qmodel, n["target"])
                if isinstance(m, own):
                    continue
            out[(n["op"], n["target"])] += 1
        return out

    mine, theirs = ops(rebuilt), ops(saved)
    extra_in_file = theirs - mine
    dropped = mine - theirs
    dropped_other = [
        k
        for k in dropped
        if not (k[0] == "call_module" and isinstance(_get_submodule(qmodel, k[1]), ACT_MODULES))
    ]
    if extra_in_file or dropped_other:
        names = [t for _, t in list(extra_in_file)[:5]] + [t for _, t in dropped_other[:5]]
        raise LoadError(
            f"{path}: the model does not match the file: the saved network and this model differ "
            f"in {names}. Pass the same float architecture that was quantized"
        )


def _check_same_arguments(
    path: Path, rebuilt: list[dict[str, Any]], saved: list[dict[str, Any]]
) -> None:
    """A node present in both graphs (same name, op and target) must have the same constants and
    the same operands in the same order. Stages only insert modules before a node's operand, so
    a position where either graph refers to a node of its own (a clamp, a smoothing quantizer)
    matches any node."""
    mine = {n["name"]: n for n in rebuilt}
    common = set(mine) & {n["name"] for n in saved}

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, dict) and isinstance(b, dict):
            if set(a) == {"node"} and set(b) == {"node"}:
                return a == b or a["node"] not in common or b["node"] not in common
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return type(a) is type(b) and a == b

    for n in saved:
        m = mine.get(n["name"])
        if m is None or (m["op"], m["target"]) != (n["op"], n["target"]):
            continue
        if not same([n["args"], n["kwargs"]], [m["args"], m["kwargs"]]):
            raise LoadError(
                f"{path}: the model does not match the file: node {n['name']} ({n['target']}) "
                f"has other arguments in the file ({n['args']}, {n['kwargs']}) than in this "
                f"model ({m['args']}, {m['kwargs']})"
            )


def _get_submodule(root: nn.Module, name: str, attr: bool = False) -> Any:
    try:
        if attr:
            mod, _, leaf = name.rpartition(".")
            return getattr(root.get_submodule(mod) if mod else root, leaf)
        return root.get_submodule(name)
    except AttributeError:
        return None


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)
