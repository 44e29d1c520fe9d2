"""Layer-wise sensitivity: where the quantization error of a network comes from.

A *unit* is one :class:`~ptqkit.quant.modules.QuantLayer` with the activation quantizers that go
with it (:func:`~ptqkit.correct.units.layer_quantizers`): the quantizer of its output (after
its activation) and a quantizer of its input that feeds nothing else (the model input before the
first conv, the flattened features before the classifier). For each unit, :func:`sensitivity`
measures on the given data:

* ``sqnr_db``: SQNR of the layer's output in the fully quantized network against the float
  network, ``10·log10(Σ y² / Σ (y - ŷ)²)`` (errors of all upstream units included);
* ``only_quantized``: the metric when only this unit is quantized (everything else float);
* ``only_float``: the metric when this unit alone stays float (everything else quantized);
* the output SQNR of the network in both configurations.

The metric is top-1 accuracy when the batches carry labels (``(input, label)``), otherwise
top-1 agreement with the float network (both in percent), integer/bool outputs (an ``argmax``)
compared by equality; for other outputs that are not ``[N, classes]`` logits it is the output
SQNR in dB. The output is selected and scored as :func:`ptqkit.evaluate` does
(:mod:`ptqkit.scorer`).

Cost: two passes over the data per layer plus two; the float reference outputs of the network
(``N × classes`` values) are kept between passes, activations never are (the per-layer SQNR pass
runs the float and quantized networks on small slices of each batch in turn).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import PTQConfig
from ..correct.scoring import Evaluator, Score
from ..correct.units import layer_quantizers
from ..data import fresh_inputs, model_device, run_model, split_batch, to_device
from ..progress import progress
from ..quant.modules import QuantLayer, float_mode, quant_layers
from ..scorer import OutputSelector, db_ratio

#: bytes of layer outputs kept at once by the per-layer SQNR pass
SQNR_BUDGET = 256 * 2**20


def layer_sqnr(model: nn.Module, data: Iterable[Any], config: PTQConfig) -> dict[str, float]:
    """SQNR (dB) of every :class:`QuantLayer`'s output, fully quantized vs float network."""
    layers = quant_layers(model)
    sums = {n: [0.0, 0.0] for n in layers}
    store: dict[str, torch.Tensor] = {}
    mode = {"float": True}

    def hook(name: str):
        def fn(m: nn.Module, a: Any, y: torch.Tensor) -> None:
            if mode["float"]:
                store[name] = y.detach().clone()  # the model may modify y in place later
            elif name in store:
                ref = store.pop(name).double()
                sums[name][0] += float(ref.pow(2).sum())
                sums[name][1] += float((ref - y.detach().double()).pow(2).sum())

        return fn

    hooks = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    device = model_device(model)
    chunk = None
    try:
        with torch.no_grad():
            for i, batch in enumerate(data):
                if config.num_batches is not None and i >= config.num_batches:
                    break
                args, kwargs = to_device(*split_batch(batch, i), device)
                single = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
                n = args[0].shape[0] if single and args[0].dim() > 0 else 1
                step = n if not single else (chunk or 1)
                a = 0
                while a < n:
                    part = (args[0][a : a + step],) if single else args
                    store.clear()
                    mode["float"] = True
                    with float_mode(model):
                        run_model(model, i, *fresh_inputs(part, kwargs))
                    if chunk is None and single:
                        per = sum(t.numel() * t.element_size() for t in store.values())
                        chunk = max(1, SQNR_BUDGET // max(1, per))
                    mode["float"] = False
                    run_model(model, i, *fresh_inputs(part, kwargs))
                    a += step
                    step = n if not single else chunk
    finally:
        for h in hooks:
            h.remove()
        store.clear()
    return {n: db_ratio(*s) for n, s in sums.items()}


# -- the report ------------------------------------------------------------------------------------
@dataclass
class LayerSensitivity:
    """One row of :class:`SensitivityReport`."""

    name: str
    kind: str
    params: int
    quantizers: list[str]
    sqnr_db: float
    only_quantized: float
    only_float: float
    out_sqnr_only_quantized_db: float
    out_sqnr_only_float_db: float


@dataclass
class SensitivityReport:
    """Per-layer sensitivity (see the module docstring). ``metric`` names the metric
    (``"accuracy"``, ``"agreement"`` or ``"sqnr_db"``); ``float_metric`` and ``quant_metric``
    are the float and fully quantized networks' values; rows are in execution order."""

    metric: str
    float_metric: float
    quant_metric: float
    quant_sqnr_db: float
    samples: int
    layers: list[LayerSensitivity] = field(default_factory=list)

    def ranked(self) -> list[LayerSensitivity]:
        """Rows from the most sensitive: largest gain when left in float, then lowest SQNR."""
        return sorted(self.layers, key=lambda r: (-(r.only_float - self.quant_metric), r.sqnr_db))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A plain-text table, one row per layer."""
        unit = "dB" if self.metric == "sqnr_db" else "%"
        head = (
            f"{self.metric}: float {self.float_metric:.2f}{unit}, quantized "
            f"{self.quant_metric:.2f}{unit} (output SQNR {self.quant_sqnr_db:.1f} dB), "
            f"{self.samples} samples"
        )
        cols = f"{'layer':<40} {'kind':<18} {'params':>8} {'SQNR dB':>8} "
        cols += f"{'only q':>8} {'only fp':>8}"
        lines = [head, cols, "-" * len(cols)]
        for r in self.layers:
            lines.append(
                f"{r.name[:40]:<40} {r.kind[:18]:<18} {r.params:>8} {r.sqnr_db:>8.1f} "
                f"{r.only_quantized:>8.2f} {r.only_float:>8.2f}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _kind(layer: QuantLayer) -> str:
    inner = layer.layer
    name = type(inner).__name__
    if not isinstance(inner, nn.Linear) and inner.groups > 1:
        dw = inner.groups == inner.in_channels
        name += " (depthwise)" if dw else f" (groups={inner.groups})"
    return name


def sensitivity(
    model: nn.Module,
    data: Iterable[Any],
    config: PTQConfig | None = None,
    output: OutputSelector = None,
) -> SensitivityReport:
    """Per-layer sensitivity of ``model`` quantized with ``config`` on ``data``.

    ``model`` is a float model (quantized here with ``config``, without fallback targets) or a
    model already returned by :func:`ptqkit.quantize` (measured as it is, and left as it was).
    ``output`` selects the tensor of the model's output to score, as in :func:`ptqkit.evaluate`
    (the same rule: :mod:`ptqkit.scorer`); integer/bool outputs (an ``argmax``) are compared by
    equality (metric ``agreement``/``accuracy``, output SQNR ``nan``).
    """
    from ..pipeline import quantize

    config = PTQConfig() if config is None else config
    if quant_layers(model):
        qmodel = model
    else:
        qmodel = quantize(model, data, config.replace(max_degradation=None, min_sqnr_db=None))
    from ..data import FreshBatches
    from ..walk import layer_order

    ev = Evaluator(qmodel, data, config, output, "sensitivity")
    full = ev.measure()
    sq = layer_sqnr(qmodel, data, config)
    units = layer_quantizers(qmodel)
    layers = quant_layers(qmodel)
    rows = []
    order = layer_order(qmodel, FreshBatches(data), config)  # the model may modify its input
    for n in progress(order, config.progress, "sensitivity"):
        alone = ev.measure(only=[n])
        left = ev.measure(floats=[n])
        rows.append(
            LayerSensitivity(
                name=n,
                kind=_kind(layers[n]),
                params=int(layers[n].weight_fp.numel()),
                quantizers=units[n],
                sqnr_db=sq[n],
                only_quantized=alone.metric,
                only_float=left.metric,
                out_sqnr_only_quantized_db=alone.sqnr_db,
                out_sqnr_only_float_db=left.sqnr_db,
            )
        )
    return SensitivityReport(
        ev.metric_name, ev.float_metric, full.metric, full.sqnr_db, ev.samples, rows
    )


__all__ = [
    "Evaluator",
    "LayerSensitivity",
    "Score",
    "SensitivityReport",
    "layer_sqnr",
    "sensitivity",
]
