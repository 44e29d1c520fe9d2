"""SmoothQuant (Xiao et al. 2023): per input channel ``s_j = max|X_j|^α / max|W_j|^(1-α)``
moves activation outliers into the weights, folded into the op before
(:mod:`ptqkit.equalize.smoothquant`); it reads the activations' ranges, so it goes over the
data before the calibration pass."""

from __future__ import annotations

from ..stage import Context
from ..technique import Technique, register


def _smoothquant(ctx: Context) -> None:
    from ..capture.verify import verify_stage
    from ..equalize.smoothquant import smooth

    smooth(ctx.qmodel, ctx.data, ctx.config, ctx.info)
    verify_stage(ctx.qmodel, ctx.ref, "SmoothQuant", ctx.info)


SMOOTHQUANT = register(
    Technique(
        "smoothquant",
        300,
        _smoothquant,
        enabled=lambda c: c.smoothquant is not None,
        again=lambda c: True,
        phase="prefix",
        fields=("smoothquant",),
        cost_key=lambda c: "smoothquant",
        prior_passes={"smoothquant": 1.5},
        reference="Xiao et al. 2023, arXiv:2211.10438",
        per_layer=True,
    )
)
