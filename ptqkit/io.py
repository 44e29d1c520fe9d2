"""Save and load quantized models: one safetensors file, no pickle.

The file holds the tensors of the quantized model's state (integer weights, their scales and zero
points, float biases, activation scales / zero points / calibrated ranges, and any parameter left
in float) and, in the safetensors header's metadata under the key ``"ptqkit"``, one JSON
document: the :class:`~ptqkit.PTQConfig`, the ptqkit and file-format versions, each layer's and
each activation quantizer's spec, state and label, a summary of :class:`~ptqkit.info.PTQInfo`, and
a SHA-256 digest of the tensor data (so that a corrupted file is detected, not silently loaded).
Saving the same model twice gives the same bytes.

Why :func:`load` needs the model's architecture: a quantized model is the user's network with
quantizers in its graph. Its structure is Python code (the ``forward`` methods of the user's
classes, traced by ``torch.fx``); rebuilding it from a file would mean executing code stored in
that file (as ``torch.load`` of a pickle does), and ptqkit never executes code from files. So a
file stores data only, and :func:`load` rebuilds the structure by running ptqkit's own prepare
step on the float architecture the caller passes, then fills it with the stored integers and
ranges: the loaded model computes bit-identical outputs.

Stages that change the structure after prepare (CLE's per-channel clamps, SmoothQuant's
smoothing quantizers) are replayed from data as well: the file lists those modules (built on load
only from a fixed registry of ptqkit's own classes) and the graph's wiring (node names, module
paths, constants), and every function the rewired graph calls must be one that tracing the
caller's architecture produced. A file can neither name code to import nor change the network
beyond those modules: any other difference is a :class:`~ptqkit.LoadError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .config import PTQConfig, QuantSpec
from .errors import ConfigError, LoadError, ModelError, PTQError, SaveError
from .info import PTQInfo
from .quant.modules import act_quants, quant_layers
from .quant.primitives import storage_dtype

FORMAT = "ptqkit.quantized"
FORMAT_VERSION = 1
#: the safetensors metadata entry holding ptqkit's JSON document
METADATA_KEY = "ptqkit"
#: prefix of the extra tensors that are not in the state dict: float weights of layers that
#: a later stage (e.g. the accuracy fallback) kept in float
_FLOAT_WEIGHT = "__float_weight__."


def _version() -> str:
    from . import __version__

    return __version__


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# -- save ----------------------------------------------------------------------------------------
def save(qmodel: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``qmodel`` (returned by :func:`ptqkit.quantize`) to ``path`` as one safetensors file.

    The write is atomic: the file is written under a temporary name in the same folder, then
    renamed over ``path``, so a crash never leaves a half-written file under ``path``.

    Raises:
        ModelError: ``qmodel`` is not a model returned by :func:`ptqkit.quantize`.
    """
    from safetensors.torch import save_file

    config = getattr(qmodel, "ptq_config", None)
    if not isinstance(qmodel, nn.Module) or not isinstance(config, PTQConfig):
        raise ModelError(
            f"save expects a model returned by ptqkit.quantize, got {type(qmodel).__name__}"
        )
    layers = quant_layers(qmodel)
    quants = act_quants(qmodel)
    # cloned: safetensors refuses tensors that share memory (tied weights)
    tensors = {k: v.detach().cpu().clone() for k, v in qmodel.state_dict().items()}
    for name, layer in layers.items():
        if not layer.quantized:  # computes with its float weight, which is not in the state
            tensors[_FLOAT_WEIGHT + name] = layer.weight_fp.detach().cpu().contiguous()
    info = getattr(qmodel, "ptq_info", None)
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ptqkit_version": _version(),
        "torch_version": torch.__version__,
        "model_class": type(qmodel).__name__,
        "config": config.to_dict(),
        "layers": {
            n: {"spec": m.spec.to_dict(), "quantized": m.quantized} for n, m in layers.items()
        },
        "quantizers": {
            n: {
                "label": q.label,
                "spec": q.spec.to_dict(),
                "mode": q.mode,
                "calibrated": q.calibrated,
            }
            for n, q in quants.items()
        },
        # without the wall-clock time of each stage: the same model, data and config must give
        # the same bytes
        "info": {**info.to_dict(), "stages": {}} if isinstance(info, PTQInfo) else {},
        "modules": _structural_modules(qmodel),
        "graph": _encode_graph(qmodel),
        "sha256": _digest(tensors),
    }
    # one metadata entry: safetensors stores the metadata as a hash map, whose order is random;
    # a single sorted JSON document keeps the file byte-for-byte reproducible
    meta = {METADATA_KEY: json.dumps(doc, sort_keys=True, default=str)}
    path = Path(path)
    if path.is_dir():
        raise SaveError(f"{path} is a folder; give the path of the file to write")
    if not (path.parent if str(path.parent) else Path(".")).is_dir():
        raise SaveError(f"{path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb+") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- structure: the modules and wiring later stages add to the prepared model --------------------
# Stages after prepare may change the structure: CLE replaces a clipping activation by a
# per-channel ``ChannelClamp``, SmoothQuant an input quantizer by a ``SmoothedActQuant``. The file
# records (1) every module of one of ptqkit's own structural classes with the attributes needed to
# construct it, and (2) the graph's wiring as plain data. Loading constructs those modules only
# from the registry below (the file merely selects an entry) and rewires the graph only with
# callables found by tracing the caller's architecture: nothing named in a file is imported or
# executed.


class _Unencodable(Exception):
    pass


def _structural_classes() -> dict[str, tuple[type, Any]]:
    """ptqkit's module classes a file may ask for: name -> (class, factory(attrs, tensors))."""
    from .quant.modules import ActQuant

    out: dict[str, tuple[type, Any]] = {
        "ActQuant": (ActQuant, lambda a, t: ActQuant(QuantSpec.from_dict(a["spec"]), a["label"])),
    }
    with contextlib.suppress(ImportError):
        from .equalize.cle import ChannelClamp

        out["ChannelClamp"] = (ChannelClamp, lambda a, t: ChannelClamp(t["lo"], t["hi"], a["axis"]))
    with contextlib.suppress(ImportError):
        from .equalize.smoothquant import SmoothedActQuant

        out["SmoothedActQuant"] = (
            SmoothedActQuant,
            lambda a, t: SmoothedActQuant(
                QuantSpec.from_dict(a["spec"]), a["label"], t["inv_scale"]
            ),
        )
    return out


def _structural_modules(qmodel: nn.Module) -> dict[str, dict[str, Any]]:
    classes = _structural_classes()
    out = {}
    for name, m in qmodel.named_modules():
        cls = type(m).__name__
        if cls in classes and type(m) is classes[cls][0]:
            attrs: dict[str, Any] = {"class": cls}
            if hasattr(m, "spec"):
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


def _encode_graph(qmodel: nn.Module) -> list[dict[str, Any]] | None:
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


def _replay_structure(
    path: Path, qmodel: nn.Module, doc: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """Give the freshly prepared ``qmodel`` the structural modules and wiring of the file."""
    saved_graph, modules = doc.get("graph"), doc.get("modules") or {}
    classes = _structural_classes()
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
        rebuilt = _encode_graph(qmodel)
        if rebuilt == saved_graph:
            return
        _check_same_network(path, qmodel, rebuilt or [], saved_graph, classes)
        functions = {
            _fn_name(n.target): n.target for n in qmodel.graph.nodes if n.op == "call_function"
        }
        methods = {n.target for n in qmodel.graph.nodes if n.op == "call_method"}
        graph, made = fx.Graph(), {}
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

    from .capture.placement import ACT_MODULES

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


# -- load ----------------------------------------------------------------------------------------
def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the metadata document of a ptqkit file, checked."""
    from safetensors import safe_open

    if not path.is_file():
        raise LoadError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            if METADATA_KEY not in meta:
                raise LoadError(
                    f"{path}: not a ptqkit quantized model (a safetensors file without ptqkit "
                    "metadata); save one with ptqkit.save"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except LoadError:
        raise
    except Exception as e:  # safetensors raises its own error type for a bad header / size
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(
            f"{path}: not a readable ptqkit file (truncated, corrupt or another format): {msg}"
        ) from None
    try:
        doc = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise LoadError(
            f"{path}: the ptqkit metadata is not valid JSON (corrupt file): {e}"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise LoadError(f"{path}: not a ptqkit quantized model (unknown metadata format)")
    version = doc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LoadError(
            f"{path}: format version {version!r} is newer than this ptqkit "
            f"({_version()}, format {FORMAT_VERSION}) can read; upgrade ptqkit"
        )
    if doc.get("sha256") != _digest(tensors):
        raise LoadError(f"{path}: the tensor data does not match its checksum (corrupt file)")
    return tensors, doc


def _field(doc: dict[str, Any], key: str, path: Path) -> Any:
    if not isinstance(doc.get(key), dict):
        raise LoadError(f"{path}: the ptqkit metadata has no valid {key!r} entry")
    return doc[key]


def _mismatch(path: Path, what: str, file_names: set[str], model_names: set[str]) -> LoadError:
    missing = sorted(file_names - model_names)[:5]
    extra = sorted(model_names - file_names)[:5]
    return LoadError(
        f"{path}: the model does not match the file: {what} in the file but not in the model: "
        f"{missing or 'none'}; in the model but not in the file: {extra or 'none'}. Pass the "
        "same float architecture that was quantized"
    )


def _check_shape(path: Path, key: str, got: torch.Tensor, want: tuple[int, ...]) -> None:
    if tuple(got.shape) != tuple(want):
        raise LoadError(
            f"{path}: the model does not match the file: {key} has shape {tuple(got.shape)} in "
            f"the file but {tuple(want)} in the model"
        )


def load(path: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Load a quantized model saved by :func:`save`, onto the float architecture ``model``.

    ``model`` is an instance of the float network that was quantized (its weights do not matter:
    the file's integers, scales and biases replace them; ``model`` itself is not modified).
    ptqkit's prepare step rebuilds the quantized structure from it — the file stores data, never
    code, and a graph cannot be rebuilt from disk without executing code (module docstring).

    Returns:
        A quantized model giving bit-identical outputs to the one saved, with ``ptq_config`` and
        ``ptq_info`` restored.

    Raises:
        LoadError: the file is missing, truncated, corrupt, of a newer format or not a ptqkit
            file, or ``model``'s structure does not match it (the message says what differs).
    """
    from .capture import prepare
    from .pipeline import attach

    path = Path(path)
    tensors, doc = _read(path)
    try:
        config = PTQConfig.from_dict(_field(doc, "config", path))
    except ConfigError as e:
        raise LoadError(f"{path}: invalid config in the file: {e}") from None
    layer_meta: dict[str, dict[str, Any]] = _field(doc, "layers", path)
    quant_meta: dict[str, dict[str, Any]] = _field(doc, "quantizers", path)
    saved_info: dict[str, Any] = _field(doc, "info", path)

    info = PTQInfo(config=config.to_dict())
    try:
        with warnings.catch_warnings():  # the quantize run already warned about these
            warnings.simplefilter("ignore")
            qmodel = prepare(model, config.replace(progress=False), info)
    except PTQError as e:
        raise LoadError(f"{path}: cannot rebuild the quantized structure on this model: {e}") from e
    layers = quant_layers(qmodel)
    if set(layers) != set(layer_meta):
        raise _mismatch(path, "quantized layers", set(layer_meta), set(layers))
    _replay_structure(path, qmodel, doc, tensors)
    layers, quants = quant_layers(qmodel), act_quants(qmodel)
    if set(quants) != set(quant_meta):
        raise _mismatch(path, "activation quantizers", set(quant_meta), set(quants))

    state = {k: v for k, v in tensors.items() if not k.startswith(_FLOAT_WEIGHT)}
    expected = set(qmodel.state_dict())
    if set(state) != expected:
        raise _mismatch(path, "tensors", set(state), expected)
    try:
        _restore_layers(path, layers, layer_meta, state, tensors)
        _restore_quantizers(path, quants, quant_meta, state)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, LoadError):
            raise
        raise LoadError(f"{path}: invalid layer or quantizer metadata: {e}") from None
    try:  # the rest (float biases, parameters of float modules) by the usual checked copy
        qmodel.load_state_dict(state, strict=False)
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise LoadError(f"{path}: the model does not match the file: {msg[:500]}") from None

    known = {f.name for f in dataclasses.fields(PTQInfo)}
    restored = PTQInfo(**{k: v for k, v in saved_info.items() if k in known})
    restored.config = config.to_dict()
    attach(qmodel, restored, config)
    return qmodel


def _restore_layers(
    path: Path,
    layers: dict[str, Any],
    layer_meta: dict[str, dict[str, Any]],
    state: dict[str, torch.Tensor],
    tensors: dict[str, torch.Tensor],
) -> None:
    """Integer weights, scales and zero points of each layer (replaced, not copied into: their
    shapes are set by quantization), then the layer computes with ``(q - z)·s``."""
    for name, layer in layers.items():
        m = layer_meta[name]
        layer.spec = QuantSpec.from_dict(m["spec"])
        w_shape = tuple(layer.weight_fp.shape)
        q = state[f"{name}.weight_int"]
        s = state[f"{name}.weight_scale"]
        z = state[f"{name}.weight_zero_point"]
        if q.numel():
            _check_shape(path, f"{name}.weight_int", q, w_shape)
            if q.dtype != storage_dtype(layer.spec):
                raise LoadError(
                    f"{path}: {name}.weight_int is {q.dtype}, expected "
                    f"{storage_dtype(layer.spec)} for {layer.spec.bits}-bit weights"
                )
            nch = w_shape[layer.spec.axis] if layer.spec.per_channel else None
            _check_shape(path, f"{name}.weight_scale", s, (nch,) if nch else ())
            _check_shape(path, f"{name}.weight_zero_point", z, (nch,) if nch else ())
        dev = layer.weight_fp.device
        layer.weight_int = q.to(dev)
        layer.weight_scale = s.to(dev)
        layer.weight_zero_point = z.to(dev)
        if m["quantized"]:
            if not q.numel():
                raise LoadError(f"{path}: layer {name} is marked quantized but has no weights")
            layer.refresh()
        else:
            w = tensors.get(_FLOAT_WEIGHT + name)
            if w is not None:
                _check_shape(path, f"float weight of {name}", w, w_shape)
                layer.weight_fp = w.to(dev)
            layer.use_float()
        for key in ("weight_int", "weight_scale", "weight_zero_point"):
            state.pop(f"{name}.{key}")


def _restore_quantizers(
    path: Path,
    quants: dict[str, Any],
    quant_meta: dict[str, dict[str, Any]],
    state: dict[str, torch.Tensor],
) -> None:
    """Scale, zero point and range of each activation quantizer, and its mode."""
    for name, q in quants.items():
        m = quant_meta[name]
        q.spec = QuantSpec.from_dict(m["spec"])
        dev = q.scale.device
        for key in ("scale", "zero_point", "range"):
            setattr(q, key, state.pop(f"{name}.{key}").to(dev))
        if q.scale.shape != q.zero_point.shape:
            raise LoadError(f"{path}: {name}: scale and zero point shapes differ")
        if m["mode"] not in ("quant", "off"):
            raise LoadError(f"{path}: {name}: unknown quantizer mode {m['mode']!r}")
        q.calibrated = bool(m["calibrated"])
        q.mode = m["mode"]
