"""GPTQ (Frantar et al. 2022): per layer, the weights quantized column by column with the
error fed back through the inverse Hessian ``H = 2XXᵀ`` of the layer's cached inputs
(:mod:`ptqkit.correct.gptq`).

For :func:`ptqkit.tune`: the candidate ``"GPTQ"`` (``gptq=GPTQOptions()``) is offered when some
layer's weights are at most :data:`~ptqkit.techniques.weights.LOW_BITS` bits (weight-only or
not; convolutions too) and AdaRound is off, on one process. Its cost from the layers' work
(:func:`estimate_seconds`), per quantized layer with ``O`` outputs, ``G`` groups, ``K`` inputs
per output and ``R`` input rows per sample over ``n = min(samples, calibration samples)``::

    t = (n / N)·t_pass                                  the quantized pass caching the inputs
      + Σ_l [R·n·(G·K² + O·K) + C·G·K³ + O·K²] / R_mm   H = 2XXᵀ and the layer's forward on
                                                        its cached rows; Cholesky, inverse,
                                                        Cholesky; the error feedback (lazy
                                                        blocks)
      + Σ_l (K·T_COL + T_LAYER)                         the column loop's small operations,
                                                        each layer's set-up (its cached pass,
                                                        the solver's tensors)

with ``C = 4/3`` (``K³/3`` + ``2K³/3`` + ``K³/3`` multiply-adds) and ``R_mm`` the probed
matrix-product rate.
"""

from __future__ import annotations

from ..config import GPTQOptions, PTQConfig
from ..stage import Context
from ..sync import active
from ..technique import Candidate, CostBasis, ModelView, Technique, register
from .weights import activations_on, not_low_bit

#: seconds per column of the solver's column loop (~10 small tensor operations on one thread)
T_COL = 5e-5
#: seconds of each layer's fixed work (measured ~20 ms a layer on 64-wide Linears, 2 cores)
T_LAYER = 0.02
#: multiply-adds of the factorizations per ``K³``
C_FACTOR = 4.0 / 3.0
#: calibration passes expected without a view of the layers (EfficientNet-Lite0 W4 g128 took
#: 196 s against a ~6 s calibration pass)
PRIOR_PASSES = 30.0


def _gptq(ctx: Context) -> None:
    from ..correct.gptq import gptq

    gptq(ctx.qmodel, ctx.data, ctx.config, ctx.info)
    activations_on(ctx)


def estimate_seconds(config: PTQConfig, basis: CostBasis) -> float:
    """Expected seconds of GPTQ under ``config`` from the base trial's layers (module
    docstring); the prior of :data:`PRIOR_PASSES` passes without a view."""
    view, rate = basis.view, basis.mm_rate
    if view is None or rate is None or not view.layers:
        return PRIOR_PASSES * basis.pass_s
    opts = config.gptq if config.gptq is not None else GPTQOptions()
    n = min(opts.samples, max(view.samples, 1))
    macs = cols = 0.0  # cols: the seconds of the column loops and the layers' set-up
    for lv in view.layers:
        if not lv.rows:
            continue
        k2 = float(lv.k) ** 2
        macs += lv.rows * n * (lv.groups * k2 + lv.out * lv.k)
        macs += C_FACTOR * lv.groups * lv.k**3 + lv.out * k2
        cols += lv.k * T_COL + T_LAYER
    return n / max(view.samples, 1) * basis.pass_s + macs / rate() + cols


def not_applicable(view: ModelView, config: PTQConfig) -> str | None:
    """Why the GPTQ candidate is not offered for the model of ``view`` under ``config``."""
    if config.adaround:
        return "AdaRound already chooses the integer weights"
    if active():
        return "GPTQ runs on one process (torch.distributed is active)"
    if not any(lv.rows for lv in view.layers):
        return "no quantized layer was reached by the calibration data"
    return not_low_bit(config)


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
        prior_passes={"gptq": PRIOR_PASSES},
        estimate=estimate_seconds,
        candidates=(Candidate("GPTQ", {"gptq": GPTQOptions()}, rank=45, applies=not_applicable),),
        reference="Frantar et al. 2022, arXiv:2210.17323",
        per_layer=True,
    )
)
