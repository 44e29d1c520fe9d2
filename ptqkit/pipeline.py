"""``ptqkit.quantize``: the registered techniques of post-training quantization, in order.

    capture (fx → torch.export → hooks, checked) ─► CLE ─► SmoothQuant ─► calibrate (one
    streaming pass) ─► auto ranges ─► range margin ─► weights (nearest, AdaRound or GPTQ) ─► bias
    correction ─► fallback (target)

Each is a :class:`ptqkit.technique.Technique` registered by its own module in
:mod:`ptqkit.techniques`; they read and write the typed :class:`ptqkit.stage.Context` and import
their implementation only when enabled. Adding one is writing that module.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from .calibrate import check_calibration
from .config import PTQConfig
from .errors import ConfigError, DataError
from .info import PTQInfo
from .stage import Context
from .sync import active
from .technique import iterating_again, run_stages
from .techniques import check as check_techniques
from .techniques import pipeline


def quantize(model: nn.Module, data: Iterable[Any], config: PTQConfig | None = None) -> nn.Module:
    """Quantize a copy of ``model`` calibrated on ``data``; ``model`` itself is left untouched.

    Args:
        model: a trained float ``nn.Module``.
        data: an iterable of batches: tensors, ``(input, target)`` tuples, or dicts of keyword
            inputs. Calibration iterates it once; AdaRound, ``"auto"`` calibration and the
            accuracy fallback iterate it again (each says so in its docs); empirical bias
            correction takes what it needs during the calibration pass.
        config: a :class:`PTQConfig` (defaults: W8 symmetric per-channel, A8 asymmetric,
            mse ranges, empirical bias correction where it is one pass: ``bias_correction="auto"``).

    Returns:
        A new module that simulates the quantized network, with integer weights
        (``QuantLayer.weight_int``), activation quantizers (``ActQuant``) and a record of what
        happened in ``.ptq_info`` (:class:`PTQInfo`).
    """
    config = PTQConfig() if config is None else config
    if not isinstance(config, PTQConfig):
        raise ConfigError(f"config must be a PTQConfig, got {type(config).__name__}")
    check_calibration(config.calibration)
    check_techniques(config)
    if config.adaround and torch.is_inference_mode_enabled():
        raise ConfigError(
            "adaround=True optimizes the rounding with autograd, which torch.inference_mode() "
            "turns off (its tensors cannot be used in backward); call ptqkit.quantize outside "
            "inference_mode (torch.no_grad() is fine), or set adaround=False"
        )
    if torch.is_inference_mode_enabled():  # the quantized model must hold normal tensors: an
        with torch.inference_mode(False):  # inference tensor refuses later in-place updates
            return quantize(model, data, config)
    again = iterating_again(pipeline(), config)
    if again and _is_one_shot(data):
        raise DataError(
            f"{', '.join(again)} iterate the data more than once, but it is a one-shot "
            f"{type(data).__name__}; pass a list of batches or a DataLoader"
        )
    ctx = Context(model=model, data=data, config=config, info=PTQInfo(config=config.to_dict()))
    run_stages(pipeline(), ctx)
    from .calibrate import distributed

    if active():  # the same model and record on every rank, or an error
        distributed.finish(ctx.qmodel, ctx.info)
    attach(ctx.qmodel, ctx.info, config)
    return ctx.qmodel


def _is_one_shot(data: Any) -> bool:
    """A generator or other iterator: a second ``iter()`` would find it exhausted."""
    try:
        return iter(data) is data
    except TypeError:
        return False  # not iterable at all: the calibration pass says so


def attach(qmodel: nn.Module, info: PTQInfo, config: PTQConfig) -> None:
    """Set ``qmodel.ptq_info`` and ``qmodel.ptq_config``. A ``GraphModule`` also lists them as
    attributes to preserve: its ``copy.deepcopy`` rebuilds it from the graph and would drop them.
    The user's state the stages' forwards changed (a ``calls`` counter, a running mean) is put
    back first (:func:`ptqkit.capture.state.release`): the model starts as the user's did."""
    from .capture.state import release

    restored = release(qmodel)
    if restored:
        info.details["state_restored"] = restored
    # nn.Module keeps any attribute; torch's stubs type Module.__setattr__'s value Tensor | Module
    qmodel.ptq_info, qmodel.ptq_config = info, config  # type: ignore[assignment]
    if isinstance(qmodel, fx.GraphModule):
        kept = qmodel.meta.setdefault("_user_preserved_attributes", {})
        kept.update(ptq_info=info, ptq_config=config)
