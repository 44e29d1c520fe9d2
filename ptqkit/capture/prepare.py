"""Turn the user's model into a copy ready to calibrate: captured, BatchNorm folded, layers
wrapped, quantizers placed (all in observe-less "off" mode). The user's model is not touched.

Capture methods are tried in order (:data:`CAPTURES`): a ``torch.fx`` trace, then the ATen graph
of ``torch.export`` (non-strict, run on the example batch: :mod:`.torch_export`), both with
in-place ops functionalised and BatchNorm folded, then per-layer hooks on a deep copy (the
model's own ``forward``, no graph: no folding, quantizers on layer inputs only). With an example
batch, each candidate is checked against the user's model (:mod:`.verify`) and rejected, with the
reason recorded, when it computes something else or when the model's forward changes its own
state (which a recorded graph does not replay). What comes out (:class:`Capture`): the copy,
the method, and the input layout its check passed in, which the calibration pass then uses.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import fx, nn

from ..config import PTQConfig
from ..data import iter_batches, leading, model_device, to_device
from ..errors import ConfigError, ModelError
from ..info import PTQInfo
from ..quant.modules import act_quants
from ..scorer import nonfinite_outputs
from .guards import refuse, unparametrize
from .inplace import functionalize
from .placement import place_in_graph, place_on_inputs, skipped, wrap_layers
from .scopes import record_scopes
from .state import StateRestore
from .torch_export import export_capture
from .trace import fold_batchnorms, trace
from .verify import Reference, check_capture
from .verify import reference as run_reference
from .weight_accounting import account

#: a captured copy, or ``None`` and why not
Captured = tuple[nn.Module | None, str]


def _graph(gm: fx.GraphModule, config: PTQConfig, info: PTQInfo, name: str) -> fx.GraphModule:
    """The rewrites of a captured graph: in-place ops functionalised, parametrizations removed,
    BatchNorm folded, layers wrapped, quantizers placed."""
    functionalize(gm)
    _unparametrize(gm, info)
    info.folded_bn = fold_batchnorms(gm) if config.fold_bn else []
    _wrap(gm, config, info, name)
    if config.activations is not None:
        place_in_graph(gm, config.activations)
    return gm


def _fx(model: nn.Module, config: PTQConfig, info: PTQInfo, ref: Reference | None) -> Captured:
    gm, reason = trace(model)
    if gm is None:
        info.trace_error = reason
        return None, f"torch.fx cannot trace {type(model).__name__} ({reason})"
    return _graph(gm, config, info, type(model).__name__), ""


def _export(model: nn.Module, config: PTQConfig, info: PTQInfo, ref: Reference | None) -> Captured:
    if ref is None:
        return None, "no example batch to run torch.export with"
    fixed = [f"argument {i}" for i, a in enumerate(ref.args) if not isinstance(a, torch.Tensor)]
    fixed += [k for k, v in ref.kwargs.items() if not isinstance(v, torch.Tensor)]
    if fixed:  # torch.export would bake the first batch's value into the graph
        return None, f"the batches carry non-tensor inputs ({', '.join(fixed)})"
    gm, reason = export_capture(model, *ref.batch)  # (the whole batch: its shapes)
    if gm is None:
        return None, f"torch.export cannot export {type(model).__name__} ({reason})"
    return _graph(gm, config, info, type(model).__name__), ""


def _hooks(model: nn.Module, config: PTQConfig, info: PTQInfo, ref: Reference | None) -> Captured:
    try:
        qmodel = copy.deepcopy(model)
    except Exception as e:
        raise ModelError(f"cannot copy the model to quantize it: {e}") from e
    _unparametrize(qmodel, info)
    info.folded_bn = []
    _wrap(qmodel, config, info, type(model).__name__)
    if config.activations is not None:
        place_on_inputs(qmodel, config.activations)
    return qmodel, ""


#: capture methods, in the order they are tried
CAPTURES: dict[str, Callable[..., Captured]] = {"fx": _fx, "export": _export, "hooks": _hooks}
#: the captures that replay a recorded graph (not the model's own forward)
GRAPH_CAPTURES = ("fx", "export")
#: what each capture loses when it is skipped for the next one
_LOSS = "no BatchNorm folding, no quantizer after adds or activations"


def _unparametrize(qmodel: nn.Module, info: PTQInfo) -> None:
    removed = unparametrize(qmodel)
    if removed:
        info.details["unparametrized"] = removed


def _wrap(qmodel: nn.Module, config: PTQConfig, info: PTQInfo, name: str) -> None:
    qmodel.eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    wrapped, skip, _, scoped = wrap_layers(qmodel, config.weights, config.skip, config.scopes)
    info.layers, info.skipped, info.skip_reasons = wrapped, skip, {}
    record_scopes(qmodel, config, info, scoped)
    if not wrapped:
        raise ModelError(
            f"{name} has no quantizable layer (Conv1d/2d/3d, Linear or "
            "ConvTranspose1d/2d/3d)" + (" left after `skip`" if skip else "")
        )


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    refuse(model)


#: samples of the first batch the capture check runs (the model once, each capture once)
CHECK_SAMPLES = 8


def _reference(model: nn.Module, args: tuple, kwargs: dict) -> Reference:
    """The reference on the first :data:`CHECK_SAMPLES` samples of the batch (the check compares
    the model and its copy on the same inputs, whichever: a quarter of a 32-sample batch costs
    a quarter, 0.2 of the 2.0 FP32 passes the default's whole cost may take), on the whole
    batch when the model does not take that slice (a batch size fixed in its code)."""
    head = leading(args, kwargs, CHECK_SAMPLES)
    if head is not None:
        try:
            ref = run_reference(model, *head)
        except ModelError:
            raise
        except Exception:
            pass
        else:
            ref.full = (args, kwargs)
            return ref
    return run_reference(model, args, kwargs)


def capture_reference(model: nn.Module, example: Any, info: PTQInfo) -> Reference | None:
    """The user's model (a deep copy) on the example batch: its output and the state its forward
    changes; ``None`` without an example. Costs one forward (recorded as stage ``verify``)."""
    _check_model(model)
    if example is None:
        return None
    # a batch the model rejects is reported by the calibration pass, which names it (and, when
    # distributed, makes every rank fail together): no check then
    try:
        _, (args, kwargs) = next(iter_batches([example]))
        args, kwargs = to_device(args, kwargs, model_device(model))
        ref = _reference(model, args, kwargs)
    except ModelError:
        raise
    except Exception:
        info.capture_attempts.append("check skipped: the model rejects the first batch")
        return None
    info.stages["verify"] = info.stages.get("verify", 0.0) + ref.seconds
    info.capture_inputs = input_specs(args, kwargs)
    bad = nonfinite_outputs(ref.output)
    if bad:  # the quantized copy can only be as finite as the model it copies: say so
        info.warn(
            f"the float model itself returns NaN/Inf on the first calibration batch"
            f"{'' if ref.full is None else f' (its first {CHECK_SAMPLES} samples, checked)'} "
            f"({'; '.join(bad)}), before any quantization: check its parameters (e.g. an Inf "
            "bias) and inputs; scores against it leave those samples out"
        )
    return ref


def _spec(t: torch.Tensor) -> list[Any]:
    return [list(t.shape), str(t.dtype).removeprefix("torch.")]


def input_specs(args: tuple, kwargs: dict) -> dict[str, Any]:
    """Shapes and dtypes of a batch's tensors (``None`` for a non-tensor input): enough to run
    a capture again on zeros of the same layout, without keeping the user's data."""
    return {
        "args": [_spec(a) if isinstance(a, torch.Tensor) else None for a in args],
        "kwargs": {k: _spec(v) if isinstance(v, torch.Tensor) else None for k, v in kwargs.items()},
    }


def zeros_like_specs(specs: dict[str, Any]) -> tuple[tuple, dict] | None:
    """Zero tensors laid out as :func:`input_specs` describes; ``None`` when an input was not a
    tensor or the description is malformed."""

    def make(s: Any) -> torch.Tensor:
        shape, dtype = s
        dt = getattr(torch, str(dtype), None)
        if not isinstance(dt, torch.dtype) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"bad input description {s!r}")
        return torch.zeros(shape, dtype=dt)

    try:
        args = tuple(make(s) for s in specs.get("args", []))
        kwargs = {k: make(s) for k, s in specs.get("kwargs", {}).items()}
    except (TypeError, ValueError, AttributeError):
        return None
    return args, kwargs


@dataclass
class Capture:
    """The copy :func:`capture_copy` made, ready to calibrate."""

    model: nn.Module
    method: str  # the key of :data:`CAPTURES` that made it
    #: its check passed with 4-D inputs in channels-last memory (:func:`.verify.check_capture`):
    #: the calibration pass feeds it that way (``Context.channels_last``)
    channels_last: bool = False


def _checked(method: str, candidate: nn.Module, ref: Reference, info: PTQInfo) -> tuple[bool, bool]:
    """Check ``candidate`` against ``ref`` (:func:`.verify.check_capture`): ``(passed, whether
    with channels-last inputs)``; a failure is recorded in ``info.capture_attempts``."""
    t1 = time.perf_counter()
    state = StateRestore(candidate)  # the check's forward must not advance the copy
    restore = partial(state.restore, candidate)
    err, where, tol, fast = check_capture(candidate, ref, restore, method in GRAPH_CAPTURES)
    info.stages["verify"] = info.stages.get("verify", 0.0) + time.perf_counter() - t1
    if tol < 0:
        info.capture_attempts.append(f"{method}: the copy fails on the batch ({where})")
        return False, False
    if err > tol:
        info.capture_attempts.append(
            f"{method}: {where} differs from the model's by a relative error of "
            f"{err:.3g} (tolerance {tol:.0e})"
        )
        return False, False
    info.capture_error = info.capture_checks["capture"] = err
    info.details["channels_last"] = fast  # the record (the value: Capture.channels_last)
    return True, fast


def _first_capture(
    model: nn.Module,
    config: PTQConfig,
    info: PTQInfo,
    ref: Reference | None,
    methods: dict[str, Callable[..., Captured]],
) -> Capture | None:
    """The first of ``methods`` whose copy passes the check against ``ref`` (the first that
    succeeds, without ``ref``); every try is recorded in ``info.capture_attempts``."""
    for method, run in methods.items():
        if method in GRAPH_CAPTURES and ref is not None and ref.state_changes:
            changed = ", ".join(ref.state_changes[:5])
            info.capture_attempts.append(
                f"{method}: the model's forward changes its state ({changed}), which a "
                "recorded graph does not replay"
            )
            continue
        try:
            candidate, reason = run(model, config, info, ref)
        except (ModelError, ConfigError):  # the model or the config, whatever the capture
            raise
        except Exception as e:  # a rewrite of this capture failed: the next one may work
            candidate, reason = None, f"failed ({type(e).__name__}: {str(e)[:200]})"
        if candidate is None:
            info.capture_attempts.append(f"{method}: {reason}")
            continue
        fast = False
        if ref is not None:
            passed, fast = _checked(method, candidate, ref, info)
            if not passed:
                continue
        info.capture_attempts.append(f"{method}: used")
        return Capture(candidate, method, fast)
    return None


def capture_copy(
    model: nn.Module,
    config: PTQConfig,
    info: PTQInfo,
    ref: Reference | None = None,
    capture: str | None = None,
) -> Capture:
    """A copy of ``model`` with :class:`QuantLayer` and :class:`ActQuant` modules in place, the
    capture that made it and the input layout to calibrate it in.

    ``ref`` (from :func:`capture_reference`, optional): check each capture against the model's
    output on one batch (see the module docstring); without it the first capture that succeeds
    is used unchecked. ``capture`` (a key of :data:`CAPTURES`): use that method only (to rebuild
    a saved model's structure)."""
    _check_model(model)
    if capture is not None and capture not in CAPTURES:
        raise ModelError(f"unknown capture {capture!r}; one of {sorted(CAPTURES)}")
    methods = {capture: CAPTURES[capture]} if capture is not None else CAPTURES
    found = _first_capture(model, config, info, ref, methods)
    if found is None:
        raise ModelError(
            f"no capture method reproduces {type(model).__name__} on the first calibration batch "
            f"(with every quantizer off): {'; '.join(info.capture_attempts)}"
        )
    qmodel, info.capture = found.model, found.method
    info.traced = info.capture in GRAPH_CAPTURES
    if len(info.capture_attempts) > 1:
        tried = "; ".join(info.capture_attempts[:-1])
        loss = f"; {_LOSS}" if info.capture == "hooks" else ""
        info.warn(f"{type(model).__name__} is captured with {info.capture} ({tried}){loss}")
    if config.weights.per_channel and config.weights.axis != 0:
        info.warn(
            f"weights are quantized per output channel (axis 0); weights.axis="
            f"{config.weights.axis} is ignored"
        )
    patterns = {n: skipped(n, qmodel.get_submodule(n), config.skip) or "" for n in info.skipped}
    for p in sorted(set(config.skip) - set(patterns.values())):
        info.warn(f"skip pattern {p!r} matches no Conv/Linear layer")
    account(qmodel, info, patterns)
    info.quantizers = {n: q.label for n, q in act_quants(qmodel).items()}
    return found


def prepare(
    model: nn.Module,
    config: PTQConfig,
    info: PTQInfo,
    ref: Reference | None = None,
    capture: str | None = None,
) -> nn.Module:
    """The copy of :func:`capture_copy` (its ``model``), for callers that calibrate it in the
    inputs' own layout."""
    return capture_copy(model, config, info, ref, capture).model
