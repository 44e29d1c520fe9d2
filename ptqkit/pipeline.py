"""``ptqkit.quantize``: the stages of post-training quantization, in order (:data:`STAGES`).

    capture (fx → torch.export → hooks, checked) ─► CLE ─► SmoothQuant ─► calibrate (one
    streaming pass) ─► auto ranges ─► range margin ─► weights (nearest, AdaRound or GPTQ) ─► bias
    correction ─► fallback (target)

Every stage has the shape of :class:`ptqkit.stage.Stage` and reads and writes the typed
:class:`ptqkit.stage.Context`; optional stages import their module only when enabled. Adding a
stage is writing its function and adding one line to :data:`STAGES`.
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
from .stage import Context, Stage, iterating_again, run_stages, tapping
from .sync import active


# -- the stages, each ``run(ctx)`` -----------------------------------------------------------------
def _capture(ctx: Context) -> None:
    from .capture import prepare
    from .capture.guards import refuse_stages
    from .capture.prepare import capture_reference
    from .capture.state import hold
    from .capture.verify import first_batch

    example, ctx.data = first_batch(ctx.data)  # a one-shot iterator gets its first batch back
    ctx.ref = capture_reference(ctx.model, example, ctx.info)
    ctx.qmodel = prepare(ctx.model, ctx.config, ctx.info, ctx.ref)
    refuse_stages(ctx.qmodel, ctx.config)
    hold(ctx.qmodel)  # every later forward starts from the user's state; attach() releases it


def _cle(ctx: Context) -> None:
    from .capture.verify import verify_stage
    from .equalize.cle import equalize

    equalize(ctx.qmodel, ctx.info)
    verify_stage(ctx.qmodel, ctx.ref, "CLE", ctx.info)


def _smoothquant(ctx: Context) -> None:
    from .capture.verify import verify_stage
    from .equalize.smoothquant import smooth

    smooth(ctx.qmodel, ctx.data, ctx.config, ctx.info)
    verify_stage(ctx.qmodel, ctx.ref, "SmoothQuant", ctx.info)


def _calibrate(ctx: Context) -> None:
    from .calibrate.session import calibrate

    with tapping(STAGES, ctx):
        ctx.calibrators = calibrate(ctx.qmodel, ctx.data, ctx.config, ctx.info)


def _auto(ctx: Context) -> None:
    from .calibrate.auto import choose_ranges

    if ctx.calibrators:
        choose_ranges(ctx.qmodel, ctx.data, ctx.calibrators, ctx.config, ctx.info)


def _range_margin(ctx: Context) -> None:
    from .calibrate.margin import widen_ranges

    widen_ranges(ctx.qmodel, ctx.config.range_margin, ctx.info)


def _quantized_activations(ctx: Context) -> None:
    from .quant.modules import set_act_mode

    set_act_mode(ctx.qmodel, "quant")


def _weights(ctx: Context) -> None:
    from .calibrate.weights import quantize_weights

    quantize_weights(ctx.qmodel, ctx.config, ctx.info)
    _quantized_activations(ctx)


def _adaround(ctx: Context) -> None:
    from .correct.adaround import adaround

    adaround(ctx.qmodel, ctx.data, ctx.config, ctx.info)
    _quantized_activations(ctx)


def _gptq(ctx: Context) -> None:
    from .correct.gptq import gptq

    gptq(ctx.qmodel, ctx.data, ctx.config, ctx.info)
    _quantized_activations(ctx)


def _bias_correction(ctx: Context) -> None:
    from .correct.bias import correct_bias

    correct_bias(ctx.qmodel, ctx.data, ctx.config, ctx.info, ctx.taps.get("bias_correction"))


def _bias_tap(ctx: Context) -> Any:
    from .correct.bias import float_means_tap

    return float_means_tap(ctx.qmodel, ctx.config)


def _fallback(ctx: Context) -> None:
    from .correct.fallback import fallback

    fallback(ctx.qmodel, ctx.data, ctx.config, ctx.info)


def _always(c: PTQConfig) -> bool:
    return True


def _has_target(c: PTQConfig) -> bool:
    return c.max_degradation is not None or c.min_sqnr_db is not None


#: the pipeline, in order
STAGES: tuple[Stage, ...] = (
    Stage("capture", _capture),
    Stage("cle", _cle, lambda c: c.cle),
    Stage("smoothquant", _smoothquant, lambda c: c.smoothquant is not None, _always),
    Stage("calibrate", _calibrate),
    Stage("auto", _auto, lambda c: c.calibration == "auto", _always),
    Stage("range_margin", _range_margin, lambda c: c.range_margin > 0),
    Stage("weights", _weights, lambda c: not c.adaround and c.gptq is None),
    Stage("adaround", _adaround, lambda c: c.adaround, _always),
    Stage("gptq", _gptq, lambda c: c.gptq is not None, _always),
    Stage(
        "bias_correction",
        _bias_correction,
        lambda c: bool(c.bias_correction),
        tap=_bias_tap,  # the float means and the batches: it never iterates the data again
    ),
    Stage("fallback", _fallback, _has_target, _always),
)


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
    if config.adaround and torch.is_inference_mode_enabled():
        raise ConfigError(
            "adaround=True optimizes the rounding with autograd, which torch.inference_mode() "
            "turns off (its tensors cannot be used in backward); call ptqkit.quantize outside "
            "inference_mode (torch.no_grad() is fine), or set adaround=False"
        )
    if torch.is_inference_mode_enabled():  # the quantized model must hold normal tensors: an
        with torch.inference_mode(False):  # inference tensor refuses later in-place updates
            return quantize(model, data, config)
    again = iterating_again(STAGES, config)
    if again and _is_one_shot(data):
        raise DataError(
            f"{', '.join(again)} iterate the data more than once, but it is a one-shot "
            f"{type(data).__name__}; pass a list of batches or a DataLoader"
        )
    ctx = Context(model=model, data=data, config=config, info=PTQInfo(config=config.to_dict()))
    run_stages(STAGES, ctx)
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
