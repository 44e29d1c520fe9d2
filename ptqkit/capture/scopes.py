"""Per-layer settings (:class:`ptqkit.config.Scope`): what each layer ended up with, and the
check that every scope's pattern matched a layer of the model.

A scope that matches nothing is almost always a typo or a name from another model (a layer
renamed by tracing, a wrapper prefix): quantizing the whole model at the base settings without a
word would be the silent failure, so it is a :class:`~ptqkit.ConfigError` naming the pattern
and a few of the model's layer names.
"""

from __future__ import annotations

from torch import nn

from ..config import PTQConfig
from ..errors import ConfigError
from ..info import PTQInfo
from ..quant.modules import quant_layers


def record_scopes(
    qmodel: nn.Module, config: PTQConfig, info: PTQInfo, scoped: dict[str, list[str]]
) -> None:
    """Check every scope matched a layer; record each layer's effective settings in
    ``info.layer_settings`` (weights spec, or ``float``, and the scopes that matched)."""
    if not config.scopes:
        return
    hits = {label for labels in scoped.values() for label in labels}
    missed = [sc.label for sc in config.scopes if sc.label not in hits]
    if missed:
        names = sorted(set(info.layers) | set(info.skipped))
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        raise ConfigError(
            f"scope pattern(s) {missed} match no Conv/Linear layer of the model; a pattern "
            f"matches a layer's module name (glob, or 're:' regex) or its class name. The "
            f"model's layers: {shown}"
        )
    layers = quant_layers(qmodel)
    for name in info.layers:
        info.layer_settings[name] = {
            "weights": layers[name].spec.to_dict(),
            "scopes": scoped.get(name, []),
        }
        iq = layers[name].input_quant
        if iq is not None and iq.spec.dynamic:
            info.layer_settings[name]["activations"] = iq.spec.to_dict()
    for name in info.skipped:
        if name in scoped:
            info.layer_settings[name] = {"float": True, "scopes": scoped[name]}
            info.skip_reasons.setdefault(name, f"scope {scoped[name][-1]!r}")
