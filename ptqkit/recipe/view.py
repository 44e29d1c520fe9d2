"""What :func:`ptqkit.tune` knows of the model once its base trial ran: each quantized layer's
shape and the rows it reads per sample (:class:`~ptqkit.technique.ModelView`), measured on one
calibration batch of the base trial's quantized model.

The view serves two things: which candidates apply to the model (``Candidate.applies``: e.g.
dynamic per-token activations only where ``nn.Linear`` layers do most of the work) and the cost
estimates from the layers' work (``CostBasis.view``: GPTQ's Hessians ``rows·K²`` and
factorizations ``K³``, AWQ's grid of forwards), before the technique was ever measured.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..data import batch_size, model_device, run_model, split_batch, to_device
from ..quant.modules import out_channels, quant_layers
from ..technique import LayerView, ModelView


def model_view(qmodel: nn.Module, calib: list[Any], samples: int) -> ModelView:
    """The quantized layers of ``qmodel`` with the rows each reads per sample on the first
    calibration batch (``rows = |output| / (out_channels · batch)``: a Linear's tokens, a conv's
    output positions; 0 for a layer that batch did not reach)."""
    layers = quant_layers(qmodel)
    rows: dict[str, float] = {n: 0.0 for n in layers}
    if calib:
        args, kwargs = split_batch(calib[0], 0)
        per = max(batch_size(args, kwargs), 1)

        def hook(mod: nn.Module, _a: Any, out: Any, name: str = "", o: int = 1) -> None:
            if isinstance(out, torch.Tensor) and not rows[name]:
                rows[name] = out.numel() / (o * per)

        handles = [
            m.register_forward_hook(
                functools.partial(hook, name=n, o=max(out_channels(m.layer), 1))
            )
            for n, m in layers.items()
        ]
        try:
            args, kwargs = to_device(args, kwargs, model_device(qmodel))
            with torch.no_grad():
                run_model(qmodel, 0, args, kwargs)
        finally:
            for h in handles:
                h.remove()
    out = []
    for n, m in layers.items():
        o = max(out_channels(m.layer), 1)
        out.append(
            LayerView(
                name=n,
                linear=isinstance(m.layer, nn.Linear),
                out=o,
                k=int(m.weight_fp.numel()) // o,
                groups=int(getattr(m.layer, "groups", 1)),
                rows=rows[n],
            )
        )
    return ModelView(tuple(out), samples, qmodel)


__all__ = ["model_view"]
