"""Equivalence check: the captured copy (quantizers off) computes what the user's model computes.

A capture (``torch.fx`` trace, per-layer hooks) and every rewrite that must keep the function
(BatchNorm folding, in-place functionalisation, CLE with bias absorption, SmoothQuant) are
checked on the first calibration batch against a deep copy of the user's model:

    err = max|a - b| / max(max|b|, tiny)        (over every tensor of the output, nested)

with ``a`` the copy's output in float mode and ``b`` the reference output; the check passes when
``err ≤ tol(dtype)`` (:data:`TOLERANCE`: 1e-4 for float32, a few hundred ulps of the largest
output value: BatchNorm folding and CLE re-associate products, which moves the last bits).

The reference forward also checks that the user's model keeps its state: parameters, buffers and
plain attributes of every submodule are compared before and after one forward of a deep copy (the
user's object is never run). A traced graph does not replay ``self.calls += 1``, ``self.cache = h``
or a buffer written in ``forward``; such a model is captured with hooks, which keep its forward.

Cost: one forward of the user's model (reference, once) and one forward of the copy per check.

Layout (:func:`check_capture`): the capture's check runs the copy with its 4-D inputs in
channels-last memory (:func:`ptqkit.data.channels_last`, the same values; oneDNN's NHWC
convolutions, about 25 % faster on EfficientNet-Lite0 with 2 threads); when it passes, the
calibration pass runs that way too (``Capture.channels_last``, carried on
``Context.channels_last``; recorded in ``info.details["channels_last"]``). A copy that fails or
differs that way is checked again in the inputs' own layout (one more forward, only then), and
calibrates in it. Graph captures only: a hooks capture runs the user's own forward as given.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import channels_last, to_device
from ..errors import ModelError
from ..quant.modules import float_mode

#: relative tolerance per floating dtype (see the module docstring)
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}
_TINY = 1e-12


def _leaves(out: Any, path: str = "output") -> Iterator[tuple[str, Any]]:
    """``(path, value)`` for every leaf of a nested output (tuples, lists, dicts, dataclasses)."""
    if isinstance(out, torch.Tensor) or out is None or isinstance(out, (int, float, bool, str)):
        yield path, out
    elif isinstance(out, dict) or hasattr(out, "items"):
        for k, v in out.items():
            yield from _leaves(v, f"{path}[{k!r}]")
    elif isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, out


def _clone_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Fresh input tensors: a forward that changes its input in place must not change the batch."""

    def c(v: Any) -> Any:
        return v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)

    return tuple(c(a) for a in args), {k: c(v) for k, v in kwargs.items()}


def output_error(got: Any, want: Any) -> tuple[float, str, float]:
    """``(max relative error, worst output path, tolerance)`` of ``got`` against ``want``;
    ``inf`` when the structures, shapes or non-tensor values differ."""
    a, b = dict(_leaves(got)), dict(_leaves(want))
    if a.keys() != b.keys():
        return float("inf"), f"output structure ({sorted(a)} vs {sorted(b)})", 0.0
    worst, where, tol = 0.0, "", TOLERANCE[torch.float32]
    for path, vb in b.items():
        va = a[path]
        if not isinstance(vb, torch.Tensor):
            if not isinstance(va, torch.Tensor) and _same(va, vb):
                continue
            return float("inf"), path, 0.0
        if not isinstance(va, torch.Tensor) or va.shape != vb.shape:
            return float("inf"), f"{path} (shape)", 0.0
        if not torch.is_floating_point(vb):
            if not torch.equal(va.to(vb.dtype), vb):
                return float("inf"), path, 0.0
            continue
        va64, vb64 = va.detach().double().cpu(), vb.detach().double().cpu()
        # equal values (the same ±inf too) and NaN in both count as equal; the scale is the
        # largest finite reference value
        same = (va64 == vb64) | (torch.isnan(va64) & torch.isnan(vb64))
        diff = torch.where(same, 0.0, (va64 - vb64).abs())
        finite = vb64[torch.isfinite(vb64)].abs()
        ref = float(finite.max()) if finite.numel() else 0.0
        err = float(diff.max()) / max(ref, _TINY) if diff.numel() else 0.0
        err = float("inf") if err != err else err  # NaN or inf in one output only
        t = TOLERANCE.get(vb.dtype, TOLERANCE[torch.float32])
        if err / t > worst / tol:
            worst, where, tol = err, path, t
    return worst, where, tol


def _stamp(v: Any) -> Any:
    """What a forward could change about a value: a tensor by identity and in-place version
    counter (no copy of the data), anything else by a deep copy."""
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v), v._version)
    try:
        return copy.deepcopy(v)
    except Exception:  # an attribute that cannot be copied is compared by identity
        return ("object", id(v))


def _state(model: nn.Module) -> dict[str, Any]:
    """Parameters, buffers and plain attributes of every submodule, stamped (:func:`_stamp`)."""
    state: dict[str, Any] = {}
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        for k, v in m.__dict__.items():
            if k.startswith("_") or k == "training" or isinstance(v, nn.Module):
                continue
            state[f"{prefix}{k}"] = _stamp(v)
        for k, v in (*m._parameters.items(), *m._buffers.items()):
            state[f"{prefix}{k}"] = _stamp(v)
    return state


def _same(a: Any, b: Any) -> bool:
    """Equal values; tensors (also inside lists, tuples, dicts) by shape, dtype and content."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all()) if a.numel() else True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # comparisons that raise count as equal only by identity
        return a is b


def changed_state(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The names of the state entries a forward added, removed or changed."""
    names = [k for k in after if k not in before or not _same(before[k], after[k])]
    return names + [k for k in before if k not in after]


@dataclass
class Reference:
    """The user's model's output on one batch, and what its forward changed in its state."""

    args: tuple
    kwargs: dict
    output: Any
    state_changes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: the whole batch ``args``/``kwargs`` were taken from (they may be its first samples only:
    #: :func:`ptqkit.capture.prepare.capture_reference`); ``torch.export`` traces on it
    full: tuple[tuple, dict] | None = None

    @property
    def batch(self) -> tuple[tuple, dict]:
        """The whole first batch (``(args, kwargs)`` when they are it)."""
        return self.full if self.full is not None else (self.args, self.kwargs)


def reference(model: nn.Module, args: tuple, kwargs: dict) -> Reference:
    """Run a deep copy of ``model`` (eval mode) once on ``(args, kwargs)``."""
    t0 = time.perf_counter()
    try:
        ref = copy.deepcopy(model).eval()
    except Exception as e:
        raise ModelError(f"cannot copy the model to check its capture: {e}") from e
    before = _state(ref)
    a, kw = _clone_inputs(args, kwargs)
    with torch.no_grad():
        out = ref(*a, **kw)
    changes = changed_state(before, _state(ref))
    return Reference(args, kwargs, out, changes, time.perf_counter() - t0)


def first_batch(data: Iterable[Any]) -> tuple[Any, Iterable[Any]]:
    """``(first batch, data)``; a one-shot iterator is given back with its first batch put back in
    front, so that calibration still sees every batch."""
    if isinstance(data, (torch.Tensor, dict)):
        return None, data  # not a sequence of batches: the calibration pass says so
    try:
        it = iter(data)
    except TypeError:
        return None, data  # the calibration pass reports it
    try:
        first = next(it)
    except StopIteration:
        return None, data
    if it is data:
        import itertools

        return first, itertools.chain([first], it)
    return first, data


def check(
    qmodel: nn.Module, ref: Reference, channels_last_inputs: bool = False
) -> tuple[float, str, float]:
    """``(error, worst output, tolerance)`` of ``qmodel`` in float mode against ``ref``
    (``channels_last_inputs``: its 4-D inputs in channels-last memory)."""
    args, kwargs = _clone_inputs(ref.args, ref.kwargs)
    if channels_last_inputs:
        args, kwargs = channels_last(args, kwargs)
    params = list(qmodel.parameters()) + list(qmodel.buffers())
    if params:
        args, kwargs = to_device(args, kwargs, params[0].device)
    with torch.no_grad(), float_mode(qmodel):
        got = qmodel(*args, **kwargs)
    return output_error(got, ref.output)


def _images(args: tuple, kwargs: dict) -> bool:
    """Whether a batch has an input channels-last memory would change (4-D floating point)."""
    vals = [*args, *kwargs.values()]
    return any(isinstance(v, torch.Tensor) and v.dim() == 4 and v.is_floating_point() for v in vals)


def check_capture(
    qmodel: nn.Module, ref: Reference, restore: Callable[[], Any], graph: bool = True
) -> tuple[float, str, float, bool]:
    """The check of a capture (see the module docstring's *Layout*): ``(error, worst output,
    tolerance, whether it passed with channels-last inputs)``; a copy that cannot run the batch
    gives tolerance ``-1``. ``restore()`` is called after each forward (the copy's state).
    ``graph=False`` (a capture that runs the user's own forward, hooks): the inputs' layout only
    (that code may need it; and its check then stays exact, error 0)."""
    fast = graph and _images(ref.args, ref.kwargs)
    for cl in (True, False) if fast else (False,):
        try:
            err, where, tol = check(qmodel, ref, channels_last_inputs=cl)
        except Exception as e:  # the copy cannot even run the batch the model runs
            err, where, tol = float("inf"), f"{type(e).__name__}: {str(e)[:200]}", -1.0
        restore()
        if tol >= 0 and err <= tol:
            return err, where, tol, cl
    return err, where, tol, False


def verify_stage(qmodel: nn.Module, ref: Reference | None, stage: str, info: Any) -> None:
    """After a rewrite that must keep the function: record its error, raise on a mismatch."""
    if ref is None:
        return
    t0 = time.perf_counter()
    err, where, tol = check(qmodel, ref)
    info.capture_checks[stage] = err
    info.stages["verify"] = info.stages.get("verify", 0.0) + time.perf_counter() - t0
    if err > tol:
        raise ModelError(
            f"{stage} changed what the model computes: {where} differs from the float model by "
            f"a relative error of {err:.3g} (tolerance {tol:.0e}) on the first calibration batch; "
            f"run without {stage} (its PTQConfig option off)"
        )
