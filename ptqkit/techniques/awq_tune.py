"""What :func:`ptqkit.tune` knows of AWQ (:mod:`ptqkit.techniques.awq`): when its candidates
apply, and what it costs before it was ever measured.

Candidates (registered by the AWQ technique): ``"AWQ"`` (AWQ's scales, then nearest rounding:
``gptq=None``) and ``"AWQ + GPTQ"`` (the scales, then GPTQ: the two compose, the paper's and
GPTQModel's usage). Both change ``techniques`` and ``gptq``, so they compete with ``"GPTQ"``
and nearest rounding (the incumbent) in the paired test. They apply when

* some layer's weights are at most :data:`~ptqkit.techniques.weights.LOW_BITS` bits (AWQ
  protects the channels that meet large activations from rounding: a low-bit problem);
* a quantized ``nn.Linear`` reads a LayerNorm/RMSNorm output (where its scales go; read from
  the base trial's graph, :func:`~ptqkit.techniques.awq.groups`; a model captured without a
  graph: it has a normalization module and a quantized Linear);
* SmoothQuant is off and the run is on one process (AWQ refuses both).

Cost (:func:`estimate_seconds`): its own float pass over the calibration data (``t_pass``),
then for each of the ``grid`` values of ``α`` and each Linear ``l`` (``O·K`` weights, ``r``
cached rows, ``r = min(rows, R·N)``)::

    t = t_pass + grid · Σ_l [r·O·K / R_mm + T_OP + E_Q·O·K·t_elem]

(the forward of the cached rows through the rounded weight, and the rounding itself: ~``E_Q``
elementwise operations per weight, at ``t_elem`` = 1 ns an element). Every Linear is counted,
not only those reading a normalization: the estimate errs long, the safe side for a budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import GPTQOptions, PTQConfig
from ..sync import active
from ..technique import CostBasis, ModelView
from .weights import not_low_bit

#: seconds of one grid point's fixed work per layer (its ~15 tensor operations: scale, ranges,
#: quantization parameters, rounding, product, error; ~2 ms measured on 32-wide Linears)
T_OP = 2e-3
#: elementwise operations per weight of one rounding (scale, round, clamp, dequantize, ...)
E_Q = 12.0
#: seconds per element of an elementwise operation
T_ELEM = 1e-9


def not_applicable(view: ModelView, config: PTQConfig) -> str | None:
    """Why the AWQ candidates are not offered for the model of ``view`` under ``config``."""
    from torch import fx, nn

    from ..equalize.smoothquant import NORMS
    from .awq import groups

    if config.smoothquant is not None:
        return "SmoothQuant is on (AWQ and SmoothQuant both move per-channel scales)"
    if active():
        return "AWQ runs on one process (torch.distributed is active)"
    low = not_low_bit(config)
    if low is not None:
        return low
    model = view.model
    if isinstance(model, fx.GraphModule):
        normed = bool(groups(model))
    else:
        normed = (
            isinstance(model, nn.Module)
            and any(isinstance(m, NORMS) for m in model.modules())
            and any(lv.linear for lv in view.layers)
        )
    if not normed:
        return "no quantized nn.Linear reads a LayerNorm/RMSNorm output (where AWQ's scales go)"
    return None


def with_gptq_not_applicable(view: ModelView, config: PTQConfig) -> str | None:
    """Why ``"AWQ + GPTQ"`` is not offered: AWQ's reasons, or AdaRound choosing the weights."""
    if config.adaround:
        return "AdaRound already chooses the integer weights"
    return not_applicable(view, config)


def _awq_on(config: PTQConfig) -> dict[str, Any]:
    from .awq import NAME, AWQOptions

    current = config.techniques.get(NAME, False)
    keep = current if current not in (False, None, True) else AWQOptions()
    return {**config.techniques, NAME: keep}


def awq_rtn(config: PTQConfig) -> Mapping[str, Any]:
    """AWQ's scales with nearest rounding: ``techniques['awq']`` on, ``gptq`` off."""
    return {"techniques": _awq_on(config), "gptq": None}


def awq_gptq(config: PTQConfig) -> Mapping[str, Any]:
    """AWQ's scales, then GPTQ (the incumbent's options, or the defaults)."""
    return {"techniques": _awq_on(config), "gptq": config.gptq or GPTQOptions()}


def estimate_seconds(config: PTQConfig, basis: CostBasis) -> float:
    """Expected seconds of AWQ under ``config`` (module docstring); two calibration passes
    without a view of the layers."""
    from .awq import TECHNIQUE, AWQOptions

    view, rate = basis.view, basis.mm_rate
    if view is None or rate is None:
        return 2.0 * basis.pass_s
    opts = TECHNIQUE.options_in(config) or AWQOptions()
    per_point = 0.0
    for lv in view.layers:
        if lv.linear and lv.rows:
            weights = lv.out * lv.k
            r = min(opts.rows, lv.rows * max(view.samples, 1))
            per_point += r * weights / rate() + T_OP + E_Q * weights * T_ELEM
    return basis.pass_s + opts.grid * per_point


__all__ = [
    "awq_gptq",
    "awq_rtn",
    "estimate_seconds",
    "not_applicable",
    "with_gptq_not_applicable",
]
