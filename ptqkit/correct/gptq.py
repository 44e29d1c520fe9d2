"""GPTQ (Frantar et al. 2022) as a pipeline stage: the integer weights of every layer chosen by
the GPTQ solver (:mod:`ptqkit.correct.gptq_solve`) from the layer's Hessian ``H = 2 X Xᵀ / n``
instead of nearest rounding (``PTQConfig.gptq``: :class:`ptqkit.config.GPTQOptions`).

**Inputs.** ``X`` holds the layer's input rows over the first ``samples`` calibration samples
(whole batches): a Linear's input vectors (every token), a conv's input patches at every output
position (im2col, :func:`ptqkit.correct.patches.patches`: whatever padding its ``forward``
applies; a grouped or depthwise conv gives one ``H`` per group, solved together). Sequential, as
the paper's reference implementation: layer ``k``'s inputs come from the model *as quantized so
far* (earlier layers with their GPTQ weights, activation quantizers on), so each layer
compensates for what the ones before it did. A traced model is walked once with the cached
layer inputs of :func:`ptqkit.walk.propagate` (each layer solved right before it runs on every
batch); a model that could not be traced runs its prefix up to each layer (``O(depth²)``).
``H`` is summed in float32 matmuls per batch into float64, solved in float32.

**Scales.** Per-channel / per-tensor scales come from ``config.weight_calibration`` on the
float weight, as for nearest rounding; group-wise ones are chosen during the solve (see the
solver). A layer no calibration data reaches is rounded to nearest, with a warning, and
recorded; so is one whose damped ``H`` does not factorize.

**Record** (``ptq_info.details["gptq"]["layers"][name]``): ``rows``, ``dead_inputs``, ``damp``,
and the layer's mean squared output error on those rows, ``Σ tr(ΔW H ΔWᵀ)/2``, with nearest
rounding (``rtn``) and with GPTQ (``gptq``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..calibrate.weights import weight_range
from ..config import PTQConfig
from ..errors import ConfigError
from ..info import PTQInfo
from ..progress import progress
from ..quant.modules import QuantLayer, quant_layers, set_act_mode
from ..quant.primitives import dequantize, qparams, quantize, storage_dtype
from ..sync import active
from ..walk import (
    RERUN,
    Rerun,
    batches,
    can_propagate,
    layer_order,
    propagate,
    run_until,
    stop_after,
)
from .gptq_solve import output_error, solve
from .patches import PATCH_BUDGET, patches

logger = logging.getLogger("ptqkit.gptq")


def weight_groups(layer: QuantLayer) -> int:
    """Independent problems of the layer: a conv's ``groups`` (1 for a Linear)."""
    return int(getattr(layer.layer, "groups", 1))


class Hessian:
    """``Σ x xᵀ`` over a layer's input rows, per conv group (``[G, K, K]``, float64), and the
    number of rows."""

    def __init__(self, layer: QuantLayer) -> None:
        self.layer = layer
        self.g = weight_groups(layer)
        k = layer.weight_fp[0].numel()
        self.sum = torch.zeros(self.g, k, k, dtype=torch.float64, device=layer.weight_fp.device)
        self.rows = 0

    def _add_rows(self, p: torch.Tensor) -> None:  # p [P, G, K]
        p = p.float()
        if self.g == 1:
            self.sum[0] += (p[:, 0].T @ p[:, 0]).double()
        else:
            self.sum += torch.bmm(p.permute(1, 2, 0), p.permute(1, 0, 2)).double()
        self.rows += p.shape[0]

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One batch: the layer's input ``x`` (before its input quantizer) and output ``y``."""
        x = x.detach()
        if self.layer.input_quant is not None:
            x = self.layer.input_quant(x)
        if isinstance(self.layer.layer, nn.Linear):
            self._add_rows(x.reshape(-1, 1, x.shape[-1]))
            return
        per_image = y[0, 0].numel()
        k = self.sum.shape[-1] * self.g
        chunk = max(1, PATCH_BUDGET // max(1, per_image * k))
        for a in range(0, x.shape[0], chunk):
            xa = x[a : a + chunk]
            rows = torch.arange(xa.shape[0] * per_image, device=x.device)
            self._add_rows(patches(self.layer.layer, xa, rows, per_image))

    def matrix(self) -> torch.Tensor:
        """``H = 2 Σ x xᵀ / n`` in float32."""
        return (2 * self.sum / max(1, self.rows)).float()


def _fixed(layer: QuantLayer, method: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A spec without groups: its scales from the float weight, as ``[G, O/G]`` (or scalars)."""
    if layer.spec.group_size is not None:
        return None
    s, z = qparams(*weight_range(layer, method), layer.spec)
    if s.dim() == 0:
        return s, z
    g = weight_groups(layer)
    return s.reshape(g, -1), z.reshape(g, -1)


def quantize_layer(layer: QuantLayer, hess: Hessian, config: PTQConfig) -> dict[str, Any]:
    """Solve ``layer`` from ``hess`` and store its integers; returns its record."""
    opts, method = config.gptq, config.weight_calibration
    assert opts is not None
    t0 = time.perf_counter()
    w_fp = layer.weight_fp.float()
    g = weight_groups(layer)
    w = w_fp.reshape(g, w_fp.shape[0] // g, -1)
    h = hess.matrix()
    fixed = _fixed(layer, method)
    res = solve(w, h, layer.spec, opts, fixed, method)
    rtn_lo, rtn_hi = weight_range(layer, method)
    rs, rz = qparams(rtn_lo, rtn_hi, layer.spec)
    rtn_q = quantize(layer.weight_fp, rs, rz, layer.spec)
    record: dict[str, Any] = {"rows": hess.rows, "dead_inputs": res.dead, "damp": res.damp}
    if res.damp is None:  # H did not factorize: nearest rounding
        layer.set_quantized(rtn_q, rs, rz)
        record["skipped"] = "the damped Hessian did not factorize: nearest rounding"
        return record
    out, spec = w_fp.shape[0], layer.spec
    scale, zp = res.scale, res.zero_point
    if scale.dim() > 0:
        shape = (out, -1) if spec.group_size is not None else (out,)
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    q = res.q.reshape(w_fp.shape).to(storage_dtype(spec))
    layer.set_quantized(q, scale, zp)
    rtn_w = dequantize(rtn_q, rs, rz, spec.axis, spec.group_size).reshape(g, out // g, -1)
    gptq_w = layer.weight.float().reshape(g, out // g, -1)
    record["rtn"] = output_error(rtn_w - w, h) / 2
    record["gptq"] = output_error(gptq_w - w, h) / 2
    record["act_order"] = bool(opts.act_order and g == 1)
    record["seconds"] = time.perf_counter() - t0
    return record


def gptq(qmodel: nn.Module, data: Iterable[Any], config: PTQConfig, info: PTQInfo) -> nn.Module:
    """Quantize the weights of every :class:`QuantLayer` of ``qmodel`` with GPTQ (module
    docstring), layer by layer in execution order; records ``info.details["gptq"]``. A layer a
    scope turns GPTQ off for (:meth:`PTQConfig.off_layers`) is rounded to nearest (the integers
    ``weight_calibration`` alone gives), recorded as ``off_by_scope``."""
    opts = config.gptq
    if opts is None:
        raise ConfigError("gptq() needs PTQConfig.gptq (a GPTQOptions)")
    if active():
        raise ConfigError(
            "GPTQ runs on one process: torch.distributed is active; quantize on one rank "
            "and share the saved model (ptqkit.save), or set gptq=None"
        )
    layers = quant_layers(qmodel)
    set_act_mode(qmodel, "quant")  # what each layer sees in the quantized model
    off = config.off_layers("gptq", layers)  # a scope's: nearest rounding, before any other
    for name in off:  # (the layers after one see its rounded weights, as they would in order)
        layers[name].set_weight_range(*weight_range(layers[name], config.weight_calibration))
    order = [n for n in layer_order(qmodel, data, config) if n not in off]
    feeds = [(a, k) for _, a, k in batches(data, config, qmodel, opts.samples)]
    report: dict[str, Any] = {}

    def solve_one(name: str, hess: Hessian) -> None:
        if hess.rows:
            report[name] = quantize_layer(layers[name], hess, config)

    engine = {"cached_inputs": can_propagate(qmodel, order)}
    with torch.no_grad():
        if engine["cached_inputs"]:
            bar = iter(progress(order, config.progress, "gptq"))

            def visit(name: str, layer: QuantLayer, inputs: Any, outputs: Any) -> Rerun:
                next(bar, None)
                hess = Hessian(layer)
                for (args, _), y in zip(inputs(), outputs()):
                    hess.add(args[0], y)
                solve_one(name, hess)
                return RERUN

            walked = propagate(qmodel, feeds, visit, order, opts.memory_budget)  # type: ignore[arg-type]
            engine.update(walked)
        else:
            for name in progress(order, config.progress, "gptq"):
                solve_one(name, _prefix_hessian(qmodel, layers[name], feeds))
    for name in order:
        if name not in report:
            layer = layers[name]
            layer.set_weight_range(*weight_range(layer, config.weight_calibration))
            report[name] = {"skipped": "no calibration data reached it: nearest rounding"}
            info.warn(f"GPTQ: {name} never ran on the calibration data; rounded to nearest")
        elif "skipped" in report[name]:
            info.warn(f"GPTQ: {name}: {report[name]['skipped']}")
    info.details["gptq"] = {
        "layers": {n: report[n] for n in order} | {n: {"off_by_scope": s} for n, s in off.items()},
        "options": {
            "damp": opts.damp,
            "block_size": opts.block_size,
            "act_order": opts.act_order,
            "samples": opts.samples,
        },
        "weight_calibration": config.weight_calibration,
        "engine": engine,
        **({"off_by_scope": off} if off else {}),
    }
    return qmodel


def _prefix_hessian(qmodel: nn.Module, layer: QuantLayer, feeds: list[Any]) -> Hessian:
    """``H`` of one layer of an untraced model: its inputs hooked while the model runs up to
    it on each batch (the layers before it already quantized)."""
    hess = Hessian(layer)

    def hook(m: nn.Module, a: Any, y: Any) -> None:
        if isinstance(a[0], torch.Tensor):
            hess.add(a[0], y)

    h = layer.register_forward_hook(hook)
    try:
        for i, (args, kwargs) in enumerate(feeds):
            with stop_after(layer):
                run_until(qmodel, args, kwargs, i)
    finally:
        h.remove()
    return hess


__all__ = ["Hessian", "gptq", "quantize_layer", "weight_groups"]
