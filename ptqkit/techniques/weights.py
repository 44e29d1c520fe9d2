"""The weights rounded to the nearest integer on ranges from min-max or an MSE search
(``weight_calibration``), per channel or per group (:mod:`ptqkit.calibrate.weights`); then the
activation quantizers are switched from observing to quantizing."""

from __future__ import annotations

from ..config import PTQConfig
from ..stage import Context
from ..technique import Candidate, Technique, register

#: the widest weights GPTQ and AWQ are offered for by :func:`ptqkit.tune`: at 8 bits nearest
#: rounding's error is already small against the activations' (the GPTQ and AWQ papers' gains
#: are at 3-4 bits; an 8-bit GPTQ trial would cost its Hessians for little)
LOW_BITS = 4


def lowest_weight_bits(config: PTQConfig) -> int:
    """The narrowest weight width ``config`` gives any layer (model-wide or in a scope)."""
    scoped = [sc.weights.bits for sc in config.scopes if sc.weights is not None and not sc.float]
    return min([config.weights.bits, *scoped])


def not_low_bit(config: PTQConfig) -> str | None:
    """Why a low-bit weight technique is not offered under ``config`` (``None``: it is)."""
    bits = lowest_weight_bits(config)
    if bits <= LOW_BITS:
        return None
    return (
        f"the weights are {bits} bits or wider: nearest rounding loses little there; offered "
        f"for weights of at most {LOW_BITS} bits"
    )


def activations_on(ctx: Context) -> None:
    """Switch every activation quantizer to quantizing (after any technique that rounds the
    weights: the ones after it see the quantized network)."""
    from ..quant.modules import set_act_mode

    set_act_mode(ctx.qmodel, "quant")


def _weights(ctx: Context) -> None:
    from ..calibrate.weights import quantize_weights

    quantize_weights(ctx.qmodel, ctx.config, ctx.info)
    activations_on(ctx)


WEIGHTS = register(
    Technique(
        "weights",
        700,
        _weights,
        enabled=lambda c: not c.adaround and c.gptq is None,
        fields=("weight_calibration",),
        # the MSE search of the ranges is what costs (14 s on EfficientNet-Lite0); nearest
        # rounding on min-max ranges is part of every trial's overhead
        cost_key=lambda c: "weights:mse" if c.weight_calibration == "mse" else None,
        prior_passes={"weights:mse": 0.5},
        candidates=(Candidate("mse weights", {"weight_calibration": "mse"}, rank=40),),
    )
)
