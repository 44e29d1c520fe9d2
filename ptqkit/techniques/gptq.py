"""GPTQ (Frantar et al. 2022): per layer, the weights quantized column by column with the
error fed back through the inverse Hessian ``H = 2XXᵀ`` of the layer's cached inputs
(:mod:`ptqkit.correct.gptq`)."""

from __future__ import annotations

from ..config import GPTQOptions
from ..stage import Context
from ..technique import Technique, register
from .weights import activations_on


def _gptq(ctx: Context) -> None:
    from ..correct.gptq import gptq

    gptq(ctx.qmodel, ctx.data, ctx.config, ctx.info)
    activations_on(ctx)


GPTQ = register(
    Technique(
        "gptq",
        720,
        _gptq,
        enabled=lambda c: c.gptq is not None,
        again=lambda c: True,
        fields=("gptq",),
        options=GPTQOptions,
        cost_key=lambda c: "gptq",
        # a rough prior: EfficientNet-Lite0 W4 g128 took 196 s against a ~6 s calibration pass
        prior_passes={"gptq": 30.0},
        reference="Frantar et al. 2022, arXiv:2210.17323",
        per_layer=True,
    )
)
