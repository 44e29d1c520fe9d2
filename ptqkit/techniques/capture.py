"""Capture: the user's model copied and its layers swapped for quantized ones (FX, then
``torch.export``, then hooks; each checked against the float model on the first batch),
with BatchNorm folded into the layer before it (Jacob et al. 2018, section 3.2)."""

from __future__ import annotations

from ..stage import Context
from ..technique import Technique, register


def _capture(ctx: Context) -> None:
    from ..capture.guards import refuse_stages
    from ..capture.prepare import capture_copy, capture_reference
    from ..capture.state import hold
    from ..capture.verify import first_batch

    example, ctx.data = first_batch(ctx.data)  # a one-shot iterator gets its first batch back
    ctx.ref = capture_reference(ctx.model, example, ctx.info)
    made = capture_copy(ctx.model, ctx.config, ctx.info, ctx.ref)
    ctx.qmodel, ctx.channels_last = made.model, made.channels_last  # (the calibration's layout)
    refuse_stages(ctx.qmodel, ctx.config)
    hold(ctx.qmodel)  # every later forward starts from the user's state; attach() releases it


CAPTURE = register(
    Technique(
        "capture",
        100,
        _capture,
        phase="prefix",
        fields=("weights", "activations", "skip", "scopes", "fold_bn"),
    )
)
