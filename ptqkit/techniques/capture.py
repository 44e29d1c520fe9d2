"""Capture: the user's model copied and its layers swapped for quantized ones (FX, then
``torch.export``, then hooks; each checked against the float model on the first batch),
with BatchNorm folded into the layer before it (Jacob et al. 2018, section 3.2)."""

from __future__ import annotations

from ..stage import Context
from ..technique import Technique, register, registered


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
    scoped_off(ctx)


def scoped_off(ctx: Context) -> None:
    """Record in ``ptq_info.layer_settings`` the techniques a scope turns off for each quantized
    layer (``"techniques_off": {technique: scope}``), and warn about a scope that turns off a
    technique the config does not enable: it changes nothing, most likely a scope written for
    another config (a warning, not an error: :func:`ptqkit.tune`'s candidates switch techniques
    on and off under the same scopes, and one file of scopes may serve several configs)."""
    from ..quant.modules import quant_layers

    config, info = ctx.config, ctx.info
    named = {n for sc in config.scopes for n, on in sc.techniques.items() if not on}
    if not named:
        return
    layers = quant_layers(ctx.qmodel)
    for t in registered():
        if t.name not in named:
            continue
        off = config.off_layers(t.name, layers)
        for layer, label in off.items():
            info.layer_settings.setdefault(layer, {}).setdefault("techniques_off", {})
            info.layer_settings[layer]["techniques_off"][t.name] = label
        if not t.enabled(config):
            scopes = sorted({s.label for s in config.scopes if s.techniques.get(t.name) is False})
            info.warn(
                f"scope(s) {scopes} turn off {t.name!r} for {len(off)} layer(s), but the config "
                f"does not enable {t.name!r}: the scope changes nothing for it"
            )


CAPTURE = register(
    Technique(
        "capture",
        100,
        _capture,
        phase="prefix",
        fields=("weights", "activations", "skip", "scopes", "fold_bn"),
    )
)
