"""What the ``ptqkit`` command reads: models (``package.module:callable`` or a ``torch.export``
``.pt2`` file), data (``package.module:callable``, a folder of images, ``.npy``/``.npz``) and
configs (TOML onto :class:`~ptqkit.PTQConfig`). Every problem with them raises
:class:`UsageError` with a one-line message naming the flag and what was wrong.

A ``.pt2`` file is checked before it is read so that loading it never unpickles arbitrary
objects: only archives whose tensors are stored raw are accepted, every ``torch.load`` inside
``torch.export.load`` runs with ``weights_only=True`` (it would otherwise fall back to full
unpickling), and archives holding compiled code (AOTInductor) or pickled objects are refused.
Arrays are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib
import json
import logging
import os
import sys
import types
import typing
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class UsageError(Exception):
    """A bad argument, input file or config (the CLI exits with code 2)."""


def one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return msg[:500] if msg else type(e).__name__


# -- models --------------------------------------------------------------------------------------
def _import_attr(spec: str, flag: str) -> Any:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise UsageError(f"{flag} {spec!r}: expected package.module:callable")
    # the current folder goes LAST: a local onnx.py, safetensors.py, ... must not shadow the
    # installed package of that name (for ptqkit's own imports as for the user's); `python -m`
    # and `python -c` put it first ("" or its path), so it is moved
    cwd = os.getcwd()
    for entry in ("", ".", cwd):
        while entry in sys.path:
            sys.path.remove(entry)
    sys.path.append(cwd)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"{flag} {spec!r}: cannot import {mod_name!r}: {one_line(e)}") from None
    except Exception as e:  # the module ran and raised
        raise UsageError(
            f"{flag} {spec!r}: importing {mod_name!r} raised {type(e).__name__}: {one_line(e)}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            top = mod_name.partition(".")[0]
            origin = getattr(module, "__file__", None) or "?"
            local = [p for p in (f"{top}.py", f"{top}/__init__.py") if os.path.isfile(p)]
            shadow = (
                f" (it was imported from {origin}: an installed module of that name comes before "
                f"the local {local[0]}; rename the local file)"
                if local and not os.path.abspath(origin).startswith(cwd + os.sep)
                else ""
            )
            raise UsageError(
                f"{flag} {spec!r}: module {mod_name!r} has no attribute {attr!r}{shadow}"
            )
        obj = getattr(obj, part)
    return obj


def _call(obj: Any, spec: str, flag: str) -> Any:
    if not callable(obj):
        return obj
    try:
        return obj()
    except Exception as e:
        raise UsageError(f"{flag} {spec!r} raised {type(e).__name__}: {one_line(e)}") from None


def load_model(spec: str) -> Any:
    """``--model``: ``package.module:callable`` or a ``.pt2`` file, as a module in eval mode."""
    from torch import nn

    if spec.endswith(".pt2"):
        model = load_pt2(Path(spec))
    elif ":" in spec:
        obj = _import_attr(spec, "--model")
        model = obj if isinstance(obj, nn.Module) else _call(obj, spec, "--model")
        if not isinstance(model, nn.Module):
            raise UsageError(
                f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module"
            )
        if "eval" in vars(model):  # ExportedProgram.module(): ATen ops, eval() disabled
            model = lift_aten(model)
    else:
        raise UsageError(f"--model {spec!r}: expected package.module:callable or a .pt2 file")
    return model.eval()


def _check_pt2(path: Path) -> None:
    """Refuse a .pt2 archive whose loading could unpickle objects or load compiled code."""
    import zipfile

    from torch.export.pt2_archive import constants as C

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            root = names[0].split("/")[0] + "/" if names and "/" in names[0] else ""
            rel = [n[len(root) :] if n.startswith(root) else n for n in names]
            if C.ARCHIVE_VERSION_PATH not in rel:
                raise UsageError(
                    f"--model {path}: not a torch.export archive of this format (no "
                    f"{C.ARCHIVE_VERSION_PATH}); re-save it with torch.export.save"
                )
            for n in rel:
                if n.startswith((C.AOTINDUCTOR_DIR, C.EXECUTORCH_DIR, C.MTIA_DIR)):
                    raise UsageError(f"--model {path}: holds compiled code ({n}); refused")
                if n.startswith((C.WEIGHTS_DIR, C.CONSTANTS_DIR)) and n.endswith(".pt"):
                    raise UsageError(f"--model {path}: legacy pickled weights ({n}); refused")
            for n, full in zip(rel, names):
                if not (n.endswith("_weights_config.json") or n.endswith("_constants_config.json")):
                    continue
                config = json.loads(z.read(full)).get("config", {})
                for fqn, meta in config.items():
                    pickled = meta.get("use_pickle") or not str(
                        meta.get("path_name", "")
                    ).startswith((C.WEIGHT_FILENAME_PREFIX, C.TENSOR_CONSTANT_FILENAME_PREFIX))
                    if pickled:
                        raise UsageError(
                            f"--model {path}: {fqn} is stored as a pickled object, which ptqkit "
                            "never loads (it could run arbitrary code); refused"
                        )
    except zipfile.BadZipFile:
        raise UsageError(f"--model {path}: not a .pt2 archive (not a zip file)") from None
    except (OSError, ValueError, AttributeError) as e:
        raise UsageError(f"--model {path}: cannot read the archive: {one_line(e)}") from None


def load_pt2(path: Path) -> Any:
    """A ``torch.export`` program from ``path`` as an ``nn.Module`` whose conv/linear/batch-norm
    calls are modules again (so ptqkit can fold and quantize them). Never unpickles objects."""
    import torch

    if not path.is_file():
        raise UsageError(f"--model {path}: no such file")
    _check_pt2(path)
    real_load = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    torch.load = weights_only_load  # the loader falls back to weights_only=False otherwise
    try:
        with warnings.catch_warnings(), _quiet_logger("torch"):
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"--model {path}: torch.export.load failed: {one_line(e)}") from None
    finally:
        torch.load = real_load
    return lift_aten(program.module())


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def lift_aten(gm: Any) -> Any:
    """Turn the ATen conv/linear/batch-norm calls of an exported graph back into ``nn`` modules
    (named after their weights) and the common ATen ops into their ``torch`` functions, so that
    BatchNorm folding and quantizer placement see the same graph as for an eager model."""
    import operator

    import torch
    import torch.nn.functional as F
    from torch import nn

    aten = torch.ops.aten
    functions = {
        aten.relu.default: torch.relu,
        aten.relu_.default: torch.relu,
        aten.hardtanh.default: F.hardtanh,
        aten.hardtanh_.default: F.hardtanh,
        aten.clamp.default: torch.clamp,
        aten.mul.Tensor: operator.mul,
        aten.cat.default: torch.cat,
        aten.flatten.using_ints: torch.flatten,
        aten.max_pool2d.default: F.max_pool2d,
        aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
        aten.mean.dim: torch.mean,
        aten.matmul.default: torch.matmul,
        aten.view.default: torch.reshape,
        aten.reshape.default: torch.reshape,
        aten.permute.default: torch.permute,
        aten.transpose.int: torch.transpose,
    }
    convs = {aten.conv1d.default: nn.Conv1d, aten.conv2d.default: nn.Conv2d}
    convs[aten.conv3d.default] = nn.Conv3d
    norms = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}

    def attr(node: Any) -> Any:
        if node is None:
            return None
        if getattr(node, "op", None) != "get_attr":
            raise LookupError
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj

    used: set[str] = set()

    def install(node: Any, module: nn.Module, weight_node: Any) -> None:
        """Call ``module`` instead of ``node``; it takes the place of the plain module that held
        its weights (same qualified name) when that one holds nothing else."""
        name = weight_node.target.rpartition(".")[0]
        existing = dict(gm.named_modules()).get(name) if name else None
        if existing is None or list(existing.children()) or name in used:
            name = f"{(name or node.name).replace('.', '_')}_{node.name}"
        used.add(name)
        parent, _, leaf = name.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)

    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        t, a = node.target, list(node.args)
        try:
            if t in convs and not node.kwargs:
                w, b = attr(a[1]), attr(a[2] if len(a) > 2 else None)
                stride, padding, dilation, groups = (a[3:7] + [1, 0, 1, 1][len(a[3:7]) :])[:4]
                conv = convs[t](
                    w.shape[1] * groups,
                    w.shape[0],
                    tuple(w.shape[2:]),
                    stride=stride,
                    padding=padding,
                    dilation=dilation,
                    groups=groups,
                    bias=b is not None,
                )
                conv.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
                if b is not None:
                    conv.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
                install(node, conv, a[1])
            elif t == aten.linear.default and not node.kwargs:
                w, b = attr(a[1]), attr(a[2] if len(a) > 2 else None)
                lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
                lin.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
                if b is not None:
                    lin.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
                install(node, lin, a[1])
            elif t == aten.batch_norm.default and len(a) >= 8 and not a[5]:
                w, b, mean, var = (attr(x) for x in a[1:5])
                val = node.meta.get("val")
                cls = norms.get(val.dim() if hasattr(val, "dim") else 4, nn.BatchNorm2d)
                bn = cls(mean.shape[0], eps=a[7], momentum=a[6], affine=w is not None)
                bn.running_mean, bn.running_var = mean.detach().clone(), var.detach().clone()
                if w is not None:
                    bn.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
                    bn.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
                install(node, bn.eval(), a[1] if w is not None else a[3])
            elif t == aten.add.Tensor and len(a) == 2 and not node.kwargs:
                node.target = operator.add
            elif t in functions:
                node.target = functions[t]
        except (LookupError, AttributeError, TypeError, IndexError):
            continue  # left as the ATen op: computed in float
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    # ExportedProgram.module() makes train()/eval() raise; the graph is fixed (exported in eval
    # mode) and the lifted modules are in eval mode, so the usual methods are safe again
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)
    return gm


# -- data ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Data:
    """Batches (re-iterable), a description, and whether they carry labels."""

    batches: Any
    description: str
    labels: bool = False
    #: ``(inputs, labels or None)`` when ptqkit batched them itself (arrays, images): they can
    #: be batched again (e.g. to the static batch of an exported program)
    arrays: tuple[Any, Any] | None = None


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers") from None


def batched(x: Any, y: Any, batch_size: int) -> list[Any]:
    n = len(x)
    if y is None:
        return [x[i : i + batch_size] for i in range(0, n, batch_size)]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def _image_tensor(path: Path, args: argparse.Namespace) -> Any:
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if args.grayscale else "RGB")
            if args.resize:
                w, h = im.size
                s = args.resize / min(w, h)
                im = im.resize(
                    (max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR
                )
            if args.crop:
                w, h = im.size
                if w < args.crop or h < args.crop:
                    raise UsageError(
                        f"--data: {path} is {w}x{h}, smaller than --crop {args.crop}; add --resize"
                    )
                left, top = (w - args.crop) // 2, (h - args.crop) // 2
                im = im.crop((left, top, left + args.crop, top + args.crop))
            arr = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"--data: cannot read image {path}: {one_line(e)}") from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)


def _image_folder(folder: Path, args: argparse.Namespace, flag: str) -> Data:
    import torch

    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise UsageError(
            f"{flag} {folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder"
        )
    if args.limit:
        files = files[: args.limit]
    mean, std = _floats(args.mean, "--mean"), _floats(args.std, "--std")
    if (mean is None) != (std is None):
        raise UsageError("--mean and --std go together")
    if mean is not None and (args.scale is not None or args.offset is not None):
        raise UsageError("give either --mean/--std or --scale/--offset, not both")
    images, first = [], None
    for f in files:
        t = _image_tensor(f, args)
        if first is None:
            first = (f, tuple(t.shape))
        elif tuple(t.shape) != first[1]:
            raise UsageError(
                f"{flag} {folder}: images of different sizes ({first[0].name}: "
                f"{'x'.join(map(str, first[1][1:]))}, {f.name}: "
                f"{'x'.join(map(str, t.shape[1:]))}); add --resize N --crop N"
            )
        images.append(t)
    x = torch.stack(images)
    c = x.shape[1]
    if mean is not None:
        if len(mean) not in (1, c) or len(std) not in (1, c):
            raise UsageError(f"--mean/--std need 1 or {c} values (the images have {c} channels)")
        m = torch.tensor(mean).reshape(1, -1, 1, 1)
        s = torch.tensor(std).reshape(1, -1, 1, 1)
        x = (x / 255.0 - m) / s
        how = f"(x/255 - mean)/std, mean={mean}, std={std}"
    else:
        scale = 1.0 / 255.0 if args.scale is None else args.scale
        offset = 0.0 if args.offset is None else args.offset
        x = x * scale + offset
        how = f"x*{scale:g}{offset:+g}"
    size = "x".join(map(str, x.shape[2:]))
    return Data(
        batched(x, None, args.batch_size),
        f"{len(files)} images from {folder} ({c}x{size}, {how})",
        arrays=(x, None),
    )


def _arrays(path: Path, args: argparse.Namespace, flag: str) -> Data:
    import numpy as np
    import torch

    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise UsageError(f"{flag} {path}: {one_line(e)} (pickled arrays are refused)") from None
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot read: {one_line(e)}") from None
    y = xk = yk = None
    if isinstance(loaded, np.ndarray):
        x = loaded
    else:
        with loaded:
            keys = list(loaded.keys())
            if not keys:
                raise UsageError(f"{flag} {path}: the archive holds no array")
            yk = next((k for k in LABEL_KEYS if k in keys), None)
            xk = next(
                (k for k in INPUT_KEYS if k in keys), next((k for k in keys if k != yk), None)
            )
            if xk is None:
                raise UsageError(
                    f"{flag} {path}: the only array is the labels {yk!r}; store the inputs "
                    f"under one of {', '.join(map(repr, INPUT_KEYS))}"
                )
            x = loaded[xk]
            y = loaded[yk] if yk is not None else None
    what = f"key {xk!r}" if y is not None or not isinstance(loaded, np.ndarray) else "the array"
    if x.dtype.kind not in "fiub" or x.ndim < 1 or len(x) == 0:
        raise UsageError(
            f"{flag} {path}: {what}: expected a non-empty numeric array, got {x.dtype} {x.shape}"
        )
    if y is not None:
        _check_labels(x, y, xk, yk, path, flag)
    if args.limit:
        x = x[: args.limit]
        y = y[: args.limit] if y is not None else None
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y).astype(np.int64)) if y is not None else None
    desc = f"{len(xt)} samples from {path} (shape {tuple(xt.shape[1:])}"
    desc += ", with labels)" if yt is not None else ")"
    return Data(batched(xt, yt, args.batch_size), desc, yt is not None, arrays=(xt, yt))


#: keys of a .npz read as the inputs / the labels, first match wins
INPUT_KEYS = ("x", "inputs", "input", "data", "images")
LABEL_KEYS = ("y", "labels", "label", "targets")


def _check_labels(x: Any, y: Any, xk: str, yk: str, path: Path, flag: str) -> None:
    """Labels are integer class indices, one per input (or one per output position)."""
    import numpy as np

    where = f"{flag} {path}: labels {yk!r}"
    if y.ndim < 1 or len(y) != len(x):
        n = len(y) if y.ndim else "a scalar"
        raise UsageError(f"{where}: {n} labels for {len(x)} inputs (key {xk!r}); need one each")
    if y.dtype.kind == "b" or y.dtype.kind not in "iuf":
        raise UsageError(f"{where}: expected integer class indices, got {y.dtype}")
    if y.dtype.kind == "f" and not np.array_equal(y, np.round(y)):
        raise UsageError(
            f"{where}: holds non-integer values ({y.dtype}); labels must be class indices "
            "(not one-hot vectors or probabilities)"
        )
    if y.size and y.min() < 0:
        raise UsageError(f"{where}: holds negative values (min {y.min()}); need class indices")


#: preprocessing flags that only image folders use
IMAGE_FLAGS = ("resize", "crop", "grayscale", "mean", "std", "scale", "offset")


def _refuse_image_flags(args: argparse.Namespace, spec: str, flag: str, kind: str) -> None:
    given = [f"--{f}" for f in IMAGE_FLAGS if getattr(args, f, None) not in (None, False)]
    if given:
        raise UsageError(
            f"{'/'.join(given)} only apply to image folders, but {flag} {spec} is {kind}, "
            "which is used as it is: store the data already preprocessed, or drop the flags"
        )


def load_data(spec: str, args: argparse.Namespace, flag: str = "--data") -> Data:
    """``--data``: ``package.module:callable``, a folder of images, or a ``.npy``/``.npz`` file."""
    from .compare import detect_metric

    p = Path(spec)
    if p.is_dir():
        return _image_folder(p, args, flag)
    if p.suffix in (".npy", ".npz"):
        if not p.is_file():
            raise UsageError(f"{flag} {p}: no such file")
        _refuse_image_flags(args, spec, flag, "an array file")
        return _arrays(p, args, flag)
    if ":" in spec and not p.exists():
        _refuse_image_flags(args, spec, flag, "a loader of batches")
        obj = _call(_import_attr(spec, flag), spec, flag)
        if isinstance(obj, (str, bytes)) or not isinstance(obj, Iterable):
            raise UsageError(f"{flag} {spec!r} returned a {type(obj).__name__}, not an iterable")
        if iter(obj) is obj:  # a one-shot iterator: keep its batches, the data is read again
            obj = list(obj)
        return Data(obj, f"batches from {spec}", detect_metric(obj) == "top1")
    raise UsageError(
        f"{flag} {spec!r}: expected package.module:callable, a folder of images, or a "
        ".npy/.npz file"
    )


# -- config --------------------------------------------------------------------------------------
def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if origin is tuple or origin is list:  # a single string is one pattern, as in PTQConfig
        return isinstance(value, str) or (
            isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        )
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    return True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "absent"
    if dataclasses.is_dataclass(hint):
        return "a table"
    if typing.get_origin(hint) in (tuple, list):
        return "a string or a list of strings"
    return getattr(hint, "__name__", str(hint))


def _check_table(d: dict[str, Any], cls: type, where: str, path: Path) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in d.items():
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(
                f"{path}: unknown key {where}{key!r}{hint}; valid keys: {', '.join(hints)}"
            )
        if not _matches(value, hints[key]):
            raise UsageError(
                f"{path}: {where}{key} must be {_type_name(hints[key])}, got "
                f"{type(value).__name__} {value!r}"
            )
        if dataclasses.is_dataclass(hints[key]) or (
            typing.get_origin(hints[key]) in (typing.Union, types.UnionType)
            and isinstance(value, dict)
        ):
            sub = next(
                h for h in (hints[key], *typing.get_args(hints[key])) if dataclasses.is_dataclass(h)
            )
            _check_table(value, sub, f"{where}{key}.", path)


def load_config(path: str | None) -> Any:
    """``--config``: a TOML file whose keys are :class:`PTQConfig` fields (``[weights]`` and
    ``[activations]`` tables for the specs; ``activations = false`` for weights only)."""
    from .calibrate import check_calibration
    from .config import PTQConfig
    from .errors import ConfigError

    if path is None:
        return PTQConfig()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    p = Path(path)
    try:
        d = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"--config {p}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {p}: invalid TOML: {one_line(e)}") from None
    if d.get("activations") is False:
        d["activations"] = None
    _check_table(d, PTQConfig, "", p)
    try:
        config = PTQConfig.from_dict(d)
        check_calibration(config.calibration)
    except ConfigError as e:
        raise UsageError(f"--config {p}: {one_line(e)}") from None
    return config
