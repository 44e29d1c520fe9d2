"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training
Quantization"): per layer (or per block, BRECQ, Li et al. 2021), the rounding of each weight
learned against the layer's float output on cached inputs (:mod:`ptqkit.correct.adaround`)."""

from __future__ import annotations

from ..config import AdaRoundOptions, PTQConfig
from ..stage import Context
from ..technique import Candidate, CostBasis, Technique, register
from .weights import activations_on

#: prior seconds of one AdaRound optimization step of one layer, when the layers' shapes are not
#: known (with them, :func:`ptqkit.correct.cost.adaround_seconds`: the cost grows with the
#: weights, not the layers: 220 ms a step for a 1024→1024 k=3 Conv1d on 2 cores)
ADAROUND_STEP_S = 2e-3


def _adaround(ctx: Context) -> None:
    from ..correct.adaround import adaround

    adaround(ctx.qmodel, ctx.data, ctx.config, ctx.info)
    activations_on(ctx)


def _estimate(config: PTQConfig, basis: CostBasis) -> float:
    """The optimization (from the layers' shapes when known) plus two passes over the data."""
    if basis.adaround_s is not None:
        steps = basis.adaround_s(config)
    else:
        steps = config.adaround_iters * basis.layers * ADAROUND_STEP_S
    return steps + 2 * basis.pass_s


ADAROUND = register(
    Technique(
        "adaround",
        710,
        _adaround,
        enabled=lambda c: c.adaround,
        again=lambda c: True,
        fields=("adaround", "adaround_iters", "adaround_options"),
        options=AdaRoundOptions,
        cost_key=lambda c: "adaround",
        estimate=_estimate,
        # GPTQ and AdaRound both choose the integer weights: the candidate replaces GPTQ (when
        # the incumbent has it) so that tune's paired test compares the two
        candidates=(Candidate("AdaRound", {"adaround": True, "gptq": None}, rank=110),),
        reference="Nagel et al. 2020, arXiv:2004.10568; Li et al. 2021, arXiv:2102.05426",
        per_layer=True,
    )
)
