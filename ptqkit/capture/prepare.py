"""Turn the user's model into a copy ready to calibrate: traced, BatchNorm folded, layers
wrapped, quantizers placed (all in observe-less "off" mode). The user's model is not touched."""

from __future__ import annotations

import copy
import time

from torch import nn

from ..config import PTQConfig
from ..errors import ModelError
from ..info import PTQInfo
from ..quant.modules import act_quants
from .placement import place_in_graph, place_on_inputs, wrap_layers
from .trace import fold_batchnorms, trace


def prepare(model: nn.Module, config: PTQConfig, info: PTQInfo) -> nn.Module:
    """A copy of ``model`` with :class:`QuantLayer` and :class:`ActQuant` modules in place."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    t0 = time.perf_counter()
    gm, reason = trace(model)
    if gm is None:
        info.trace_error = reason
        info.warn(
            f"torch.fx cannot trace {type(model).__name__} ({reason}); falling back to quantizing "
            "each Conv/Linear and its input in place (no BatchNorm folding, no quantizer after "
            "adds or activations)"
        )
        try:
            qmodel = copy.deepcopy(model)
        except Exception as e:
            raise ModelError(f"cannot copy the model to quantize it: {e}") from e
    else:
        info.traced = True
        qmodel = gm
        if config.fold_bn:
            info.folded_bn = fold_batchnorms(gm)
    qmodel.eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    if config.weights.per_channel and config.weights.axis != 0:
        info.warn(
            f"weights are quantized per output channel (axis 0); weights.axis="
            f"{config.weights.axis} is ignored"
        )
    wrapped, skipped, used = wrap_layers(qmodel, config.weights, config.skip)
    info.layers, info.skipped = wrapped, skipped
    for p in sorted(set(config.skip) - used):
        info.warn(f"skip pattern {p!r} matches no Conv/Linear layer")
    if not wrapped:
        raise ModelError(
            f"{type(model).__name__} has no quantizable layer (Conv1d/2d/3d or Linear) "
            + ("left after `skip`" if skipped else "")
        )
    if config.activations is not None:
        if gm is not None:
            place_in_graph(gm, config.activations)
        else:
            place_on_inputs(qmodel, config.activations)
    info.quantizers = {n: q.label for n, q in act_quants(qmodel).items()}
    info.stages["prepare"] = time.perf_counter() - t0
    return qmodel
