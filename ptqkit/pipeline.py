"""``ptqkit.quantize``: the stages of post-training quantization, in order.

    capture ─► equalize (CLE, SmoothQuant) ─► calibrate (one streaming pass) ─► choose ranges
            ─► quantize weights (nearest or AdaRound) ─► bias correction ─► fallback (target)

Each stage is a plain function that can also be called alone; optional stages are imported only
when the config asks for them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from .calibrate import check_calibration
from .calibrate.session import calibrate
from .capture import prepare
from .capture.guards import refuse_stages
from .capture.prepare import capture_reference
from .capture.verify import first_batch, verify_stage
from .config import PTQConfig
from .errors import ConfigError, DataError
from .info import PTQInfo
from .quant.modules import set_act_mode
from .quant.weights import quantize_weights


def _timed(info: PTQInfo, stage: str, fn: Any, *args: Any) -> Any:
    t0 = time.perf_counter()
    out = fn(*args)
    info.stages[stage] = info.stages.get(stage, 0.0) + time.perf_counter() - t0
    return out


def quantize(model: nn.Module, data: Iterable[Any], config: PTQConfig | None = None) -> nn.Module:
    """Quantize a copy of ``model`` calibrated on ``data``; ``model`` itself is left untouched.

    Args:
        model: a trained float ``nn.Module``.
        data: an iterable of batches: tensors, ``(input, target)`` tuples, or dicts of keyword
            inputs. Calibration iterates it once; AdaRound, empirical bias correction, ``"auto"``
            calibration and the accuracy fallback iterate it again (each says so in its docs).
        config: a :class:`PTQConfig` (defaults: W8 symmetric per-channel, A8 asymmetric, minmax).

    Returns:
        A new module that simulates the quantized network, with integer weights
        (``QuantLayer.weight_int``), activation quantizers (``ActQuant``) and a record of what
        happened in ``.ptq_info`` (:class:`PTQInfo`).
    """
    config = PTQConfig() if config is None else config
    if not isinstance(config, PTQConfig):
        raise ConfigError(f"config must be a PTQConfig, got {type(config).__name__}")
    check_calibration(config.calibration)
    if config.adaround and torch.is_inference_mode_enabled():
        raise ConfigError(
            "adaround=True optimizes the rounding with autograd, which torch.inference_mode() "
            "turns off (its tensors cannot be used in backward); call ptqkit.quantize outside "
            "inference_mode (torch.no_grad() is fine), or set adaround=False"
        )
    if torch.is_inference_mode_enabled():  # the quantized model must hold normal tensors: an
        with torch.inference_mode(False):  # inference tensor refuses later in-place updates
            return quantize(model, data, config)
    again = _stages_iterating_again(config)
    if again and _is_one_shot(data):
        raise DataError(
            f"{', '.join(again)} iterate the data more than once, but it is a one-shot "
            f"{type(data).__name__}; pass a list of batches or a DataLoader"
        )
    info = PTQInfo(config=config.to_dict())
    example, data = first_batch(data)  # a one-shot iterator gets its first batch put back
    ref = capture_reference(model, example, info)
    qmodel = prepare(model, config, info, ref)
    refuse_stages(qmodel, config)
    if config.cle:
        from .equalize.cle import equalize

        _timed(info, "cle", equalize, qmodel, info)
        verify_stage(qmodel, ref, "CLE", info)
    if config.smoothquant is not None:
        from .equalize.smoothquant import smooth

        _timed(info, "smoothquant", smooth, qmodel, data, config, info)
        verify_stage(qmodel, ref, "SmoothQuant", info)
    calibrators = calibrate(qmodel, data, config, info)
    if config.calibration == "auto" and calibrators:
        from .calibrate.auto import choose_ranges

        _timed(info, "auto", choose_ranges, qmodel, data, calibrators, config, info)
    if config.range_margin > 0:
        from .analysis.coverage import widen_ranges

        widen_ranges(qmodel, config.range_margin, info)
    if config.adaround:
        from .correct.adaround import adaround

        _timed(info, "adaround", adaround, qmodel, data, config, info)
    else:
        _timed(info, "weights", quantize_weights, qmodel, config, info)
    set_act_mode(qmodel, "quant")
    if config.bias_correction:
        from .correct.bias import correct_bias

        _timed(info, "bias_correction", correct_bias, qmodel, data, config, info)
    if config.max_degradation is not None or config.min_sqnr_db is not None:
        from .analysis.fallback import fallback

        _timed(info, "fallback", fallback, qmodel, data, config, info)
    attach(qmodel, info, config)
    return qmodel


def _stages_iterating_again(config: PTQConfig) -> list[str]:
    """The stages of ``config`` that run over the data after the calibration pass."""
    stages = {
        "calibration='auto'": config.calibration == "auto",
        "smoothquant": config.smoothquant is not None,
        "adaround": config.adaround,
        "empirical bias correction": config.bias_correction == "empirical",
        "the accuracy fallback": config.max_degradation is not None
        or config.min_sqnr_db is not None,
    }
    return [name for name, on in stages.items() if on]


def _is_one_shot(data: Any) -> bool:
    """A generator or other iterator: a second ``iter()`` would find it exhausted."""
    try:
        return iter(data) is data
    except TypeError:
        return False  # not iterable at all: the calibration pass says so


def attach(qmodel: nn.Module, info: PTQInfo, config: PTQConfig) -> None:
    """Set ``qmodel.ptq_info`` and ``qmodel.ptq_config``. A ``GraphModule`` also lists them as
    attributes to preserve: its ``copy.deepcopy`` rebuilds it from the graph and would drop them."""
    qmodel.ptq_info, qmodel.ptq_config = info, config
    if isinstance(qmodel, fx.GraphModule):
        kept = qmodel.meta.setdefault("_user_preserved_attributes", {})
        kept.update(ptq_info=info, ptq_config=config)
