"""``--data`` and ``--eval-data``: ``package.module:callable`` (an iterable of batches), a folder
of images (preprocessed by the image flags), or a ``.npy``/``.npz`` file (read with
``allow_pickle=False``; labels under ``y``/``labels``/... are checked to be class indices, one per
input). Every problem raises :class:`~.usage.UsageError` naming the flag and what was wrong."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .usage import UsageError, one_line
from .user_code import call, import_attr

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


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
    """``x`` (and labels ``y``) in batches of ``batch_size``, the last one possibly smaller."""
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
    if mean is not None and std is not None:  # given together (checked above)
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


def _check_labels(
    x: Any, y: Any, xk: str | None, yk: str | None, path: Path, flag: str
) -> None:
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
    from ..compare import detect_metric

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
        obj = call(import_attr(spec, flag), spec, flag)
        if isinstance(obj, (str, bytes)) or not isinstance(obj, Iterable):
            raise UsageError(f"{flag} {spec!r} returned a {type(obj).__name__}, not an iterable")
        if iter(obj) is obj:  # a one-shot iterator: keep its batches, the data is read again
            obj = list(obj)
        return Data(obj, f"batches from {spec}", detect_metric(obj) == "top1")
    raise UsageError(
        f"{flag} {spec!r}: expected package.module:callable, a folder of images, or a "
        ".npy/.npz file"
    )
