"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", section 4.1): per
channel, ``s = sqrt(r1 / r2)`` scales the weights of two consecutive layers apart so both have
the same range (:mod:`ptqkit.equalize.cle`); data-free, checked against the float model."""

from __future__ import annotations

from ..stage import Context
from ..technique import Candidate, Technique, register


def _cle(ctx: Context) -> None:
    from ..capture.verify import verify_stage
    from ..equalize.cle import equalize

    equalize(ctx.qmodel, ctx.info, ctx.config)
    verify_stage(ctx.qmodel, ctx.ref, "CLE", ctx.info)


CLE = register(
    Technique(
        "cle",
        200,
        _cle,
        enabled=lambda c: c.cle,
        phase="prefix",
        fields=("cle",),
        cost_key=lambda c: "cle",
        prior_passes={"cle": 0.2},
        candidates=(
            Candidate("CLE", {"cle": True}, rank=70),
            Candidate("no CLE", {"cle": False}, rank=80),
        ),
        reference="Nagel et al. 2019, arXiv:1906.04721",
        per_layer=True,
    )
)
