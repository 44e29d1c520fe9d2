"""Units of a quantized network: one :class:`~ptqkit.quant.modules.QuantLayer` with the
activation quantizers that go with it (:func:`layer_quantizers`), and a temporary precision state
in which some units stay float (:func:`precision`).

The quantizers of a unit are the quantizer of the layer's output (after its clipping activation,
CLE's :class:`~ptqkit.graph.ChannelClamp` included) and a quantizer of its input that feeds
nothing else (the model input before the first conv, the flattened features before the
classifier). Sensitivity (:mod:`ptqkit.analysis.sensitivity`) and fallback
(:mod:`ptqkit.correct.fallback`) measure and keep units in float, never half a unit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import fx, nn

from ..graph import after_activations, input_quantizer, is_passthrough
from ..quant.modules import ActQuant, act_quants, quant_layers
from ..typed import submodule, target_name


# -- units -------------------------------------------------------------------------------------
def layer_quantizers(model: nn.Module) -> dict[str, list[str]]:
    """For each :class:`QuantLayer`, the activation quantizers that stay float with it."""
    layers = quant_layers(model)
    if not isinstance(model, fx.GraphModule):
        return {
            n: ([f"{n}.input_quant"] if m.input_quant is not None else [])
            for n, m in layers.items()
        }

    def is_aq(n: fx.Node) -> bool:
        return n.op == "call_module" and isinstance(submodule(model, n), ActQuant)

    def consumers(n: fx.Node) -> list[fx.Node]:
        out = []
        for u in n.users:
            if is_passthrough(u, model):
                out += consumers(u)
            else:
                out.append(u)
        return out

    units: dict[str, list[str]] = {  # a layer's own input quantizer (a dynamic one) is its
        n: [f"{n}.input_quant"] if m.input_quant is not None else [] for n, m in layers.items()
    }
    for node in model.graph.nodes:
        if node.op != "call_module" or node.target not in units:
            continue
        cur = after_activations(node, model)  # CLE's clamps included
        units[node.target] += [target_name(u) for u in cur.users if is_aq(u)]
        a = input_quantizer(node, model)
        if a is not None and all(  # the layer's own quantizer (nothing else reads it)
            c.op == "call_module" and c.target == node.target for c in consumers(a)
        ):
            units[node.target].append(target_name(a))
    return units


@contextmanager
def precision(
    model: nn.Module, floats: Iterable[str] = (), only: Iterable[str] | None = None
) -> Iterator[None]:
    """Temporarily keep the units ``floats`` in float (or, with ``only``, every unit but those);
    quantizers that belong to no unit stay on unless ``only`` is given. Restored on exit."""
    layers, quants = quant_layers(model), act_quants(model)
    units = layer_quantizers(model)
    off = set(floats) if only is None else set(layers) - set(only)
    qoff = {q for n in off for q in units.get(n, [])}
    if only is not None:
        keep = {q for n in only for q in units.get(n, [])}
        qoff |= set(quants) - keep
    saved_l = {
        n: (m.quantized, m.layer._buffers["weight"], m.layer._parameters.get("bias"))
        for n, m in layers.items()
    }
    saved_q = {n: q.mode for n, q in quants.items()}
    try:
        for n in off:
            layers[n].use_float()
        for q in qoff:
            if q in quants:
                quants[q].mode = "off"
        yield
    finally:
        for n, (was, w, b) in saved_l.items():
            layers[n].layer._buffers["weight"] = w
            if "bias" in layers[n].layer._parameters:
                layers[n].layer._parameters["bias"] = b
            layers[n].quantized = was
        for n, mode in saved_q.items():
            quants[n].mode = mode


__all__ = ["layer_quantizers", "precision"]
