"""Batches as users give them: a tensor, a tuple/list whose first item is the input (the rest,
e.g. labels, is ignored for calibration), or a dict of keyword inputs. An input may itself be a
nest of tuples, lists and dicts of tensors (``model(((x, y), {"z": z}))``): the tensors inside
are found, moved and copied at any depth.

A batch the model cannot run is a :class:`DataError` that names whose code failed
(:func:`run_model`): the user's forward ("the model rejected batch 3", with the input shapes)
or ptqkit's own code on an input kind it does not support (a sparse or complex tensor reaching
an activation quantizer: "ptqkit cannot run batch 3 (inputs: (16, 8) float32 sparse_coo): its
own code failed at ptqkit/...: the batch holds a sparse_coo tensor ...")."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .errors import DataError

Batch = tuple[tuple[Any, ...], dict[str, Any]]


def split_batch(batch: Any, index: int = 0) -> Batch:
    """``(args, kwargs)`` to call the model with for one batch."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, dict):
        if not batch:
            raise DataError(f"batch {index} is an empty dict")
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError(f"batch {index} is an empty {type(batch).__name__}")
        first = batch[0]
        if isinstance(first, dict):
            return (), dict(first)
        return (first,), {}
    raise DataError(
        f"batch {index} is a {type(batch).__name__}; expected a tensor, a tuple/list whose first "
        "item is the input, or a dict of keyword inputs"
    )


def batch_target(batch: Any) -> Any:
    """The label part of a ``(input, target)`` batch, or ``None``."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    return None


def _nested(v: Any) -> list[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in _nested(x)]
    if isinstance(v, dict):
        return [t for x in v.values() for t in _nested(x)]
    return []


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """Every tensor of a batch, nested ones included, in order."""
    return _nested((*args, *kwargs.values()))


def batch_size(args: tuple, kwargs: dict) -> int:
    ts = _tensors(args, kwargs)
    return int(ts[0].shape[0]) if ts and ts[0].dim() > 0 else 1


def leading(args: tuple, kwargs: dict, n: int) -> Batch | None:
    """The batch's first ``n`` samples (every tensor whose first dimension is the batch's,
    at any depth, cut to ``[:n]``; other values kept), or ``None`` when it has no more than
    ``n`` samples."""
    size = batch_size(args, kwargs)
    if size <= n:
        return None

    def cut(t: torch.Tensor) -> torch.Tensor:
        return t[:n] if t.dim() > 0 and t.shape[0] == size else t

    return _map(args, kwargs, cut)


def _map(args: tuple, kwargs: dict, fn: Any) -> Batch:
    """``fn`` applied to every tensor of the batch, at any depth of its tuples, lists and
    dicts (other values kept)."""

    def f(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return fn(v)
        if isinstance(v, tuple) and hasattr(v, "_fields"):  # a namedtuple
            return type(v)(*(f(x) for x in v))
        if isinstance(v, (tuple, list)):
            return type(v)(f(x) for x in v)
        if isinstance(v, dict):
            return {k: f(x) for k, x in v.items()}
        return v

    return tuple(f(a) for a in args), {k: f(v) for k, v in kwargs.items()}


def to_device(args: tuple, kwargs: dict, device: torch.device) -> Batch:
    return _map(args, kwargs, lambda t: t.to(device))


def channels_last(args: tuple, kwargs: dict) -> Batch:
    """The batch with its 4-D floating-point tensors in channels-last memory (same values): a
    ``Conv2d`` given a channels-last input runs oneDNN's NHWC kernels and returns channels-last
    outputs, and elementwise operations keep the layout. Measured on EfficientNet-Lite0
    (simulated W8A8, 128 crops, 2 threads): a layer-by-layer pass 9.0 s NCHW, 7.2 s this way.
    The sums inside a conv then run in another order: outputs differ in the last float bits
    (and an activation on a rounding boundary of its grid can land on the neighbouring level),
    which statistics over many samples, as bias correction's means, do not notice."""

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4 and t.is_floating_point() and t.layout == torch.strided:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    return _map(args, kwargs, move)


def fresh_inputs(args: tuple, kwargs: dict) -> Batch:
    """Copies of the input tensors: a model that modifies its input in place (``x.relu_()``)
    must not change the batch a later pass (float or quantized) runs on."""
    return _map(args, kwargs, torch.Tensor.clone)


def _copied(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, (tuple, list)):
        return type(batch)(_copied(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _copied(v) for k, v in batch.items()}
    return batch


class FreshBatches:
    """``data`` whose batches are copied as they are read (:func:`fresh_inputs` for a whole
    iterable): a pass of a model that modifies its input in place leaves ``data`` as it was."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data = data

    def __iter__(self) -> Iterator[Any]:
        return (_copied(batch) for batch in self.data)


def model_device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def iter_batches(
    data: Iterable[Any], num_batches: int | None = None
) -> Iterator[tuple[int, Batch]]:
    """``(index, (args, kwargs))`` for each batch; :class:`DataError` if there is none."""
    if isinstance(data, (torch.Tensor, dict)):
        raise DataError(
            f"data must be an iterable of batches (a DataLoader, a list of tensors), not a single "
            f"{type(data).__name__}; wrap it in a list: [x]"
        )
    try:
        it = iter(data)
    except TypeError:
        raise DataError(f"data must be iterable, got {type(data).__name__}") from None
    seen = 0
    for i, batch in enumerate(it):
        if num_batches is not None and i >= num_batches:
            break
        args, kwargs = split_batch(batch, i)
        ts = _tensors(args, kwargs)
        if not ts:
            raise DataError(f"batch {i} holds no tensor")
        if any(t.numel() == 0 for t in ts):
            raise DataError(f"batch {i} is empty (a tensor of shape {tuple(ts[0].shape)})")
        seen += 1
        yield i, (args, kwargs)
    if seen == 0:
        raise DataError("the data is empty: no batch to calibrate or evaluate on")


def describe(args: tuple, kwargs: dict) -> str:
    """Each input tensor's shape, dtype, and layout and device where not the usual ones."""
    out = []
    for t in _tensors(args, kwargs):
        d = f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
        if t.layout != torch.strided:
            d += f" {str(t.layout).removeprefix('torch.')}"
        if t.device.type != "cpu":
            d += f" on {t.device}"
        out.append(d)
    return ", ".join(out) if out else "no tensor"


def _ptqkit_frame(e: BaseException) -> str | None:
    """``"ptqkit/calibrate/watch.py:113"`` when the innermost frame of ``e``'s traceback
    outside torch is ptqkit's own code (not the user's forward), else ``None``."""
    import os
    import traceback

    here = os.path.dirname(os.path.abspath(__file__))
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    for fr in reversed(traceback.extract_tb(e.__traceback__)):
        path = os.path.abspath(fr.filename)
        if path.startswith(torch_dir + os.sep):
            continue
        if path.startswith(here + os.sep) and path != os.path.abspath(__file__):
            return f"ptqkit/{os.path.relpath(path, here)}:{fr.lineno}"
        return None
    return None


def _unsupported(args: tuple, kwargs: dict) -> str:
    """What in a batch ptqkit's code may not handle (its layout or dtype), or ``""``."""
    why = []
    for t in _tensors(args, kwargs):
        if t.layout != torch.strided:
            lay = str(t.layout).removeprefix("torch.")
            why.append(
                f"a {lay} tensor {tuple(t.shape)}: ptqkit observes and quantizes dense tensors; "
                "give it dense (x.to_dense())"
            )
        elif t.is_complex():
            why.append(f"a complex tensor {tuple(t.shape)}: ptqkit quantizes real tensors")
    return "; ".join(dict.fromkeys(why))


def run_model(model: nn.Module, index: int, args: tuple, kwargs: dict) -> Any:
    """Call the model on one batch; an error names the batch, its inputs and whose code failed
    (see the module docstring)."""
    try:
        return model(*args, **kwargs)
    except Exception as e:  # whatever the user's forward raises (AssertionError, KeyError, ...)
        from .errors import CalibrationError, PTQError

        if isinstance(e, PTQError):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # ptqkit's own code (an activation quantizer's statistics, not the user's layer that a
        # QuantLayer runs) failed on an input kind it does not support: blame that, not the model
        where, why = _ptqkit_frame(e), _unsupported(args, kwargs)
        if where is not None and why:
            raise DataError(
                f"ptqkit cannot run batch {index} (inputs: {describe(args, kwargs)}): its own "
                f"code failed at {where} ({msg}): the batch holds {why}"
            ) from e
        err = CalibrationError if "NaN" in msg else DataError
        shapes = [tuple(t.shape) for t in _tensors(args, kwargs)]
        raise err(f"the model rejected batch {index} (input shapes {shapes}): {msg}") from e
