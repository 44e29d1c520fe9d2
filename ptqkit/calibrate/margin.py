"""Headroom on calibrated activation ranges (``PTQConfig.range_margin``): a remedy when the data
met in use exceeds the calibration data (measured by :mod:`ptqkit.analysis.range_coverage`).

A range ``[lo, hi]`` on its integer grid becomes ``[lo - m·(hi - lo), hi + m·(hi - lo)]`` (a side
at 0 stays at 0, so that ReLU outputs keep an exact zero); the step grows by ``1 + 2m``, and so
does the rounding noise: a margin trades in-distribution precision for fewer saturated values.
"""

from __future__ import annotations

import torch
from torch import nn

from ..info import PTQInfo
from ..quant.modules import act_quants


def widen_ranges(model: nn.Module, margin: float, info: PTQInfo | None = None) -> int:
    """Widen the grid of every calibrated activation quantizer by ``margin·(hi - lo)`` on each
    side (a side at 0, e.g. after a ReLU, stays at 0). Returns the number of quantizers changed;
    records ``range_margin`` in ``info.details``."""
    changed = 0
    for q in act_quants(model).values():
        if not q.calibrated or margin <= 0:
            continue
        lo = (q.spec.qmin - q.zero_point.float()) * q.scale
        hi = (q.spec.qmax - q.zero_point.float()) * q.scale
        width = hi - lo
        lo_new = torch.where(q.range[0] >= 0, torch.zeros_like(lo), lo - margin * width)
        hi_new = torch.where(q.range[1] <= 0, torch.zeros_like(hi), hi + margin * width)
        mode = q.mode
        q.set_range(lo_new, hi_new)
        q.mode = mode
        changed += 1
    if info is not None:
        info.details["range_margin"] = {"margin": margin, "quantizers": changed}
    return changed


__all__ = ["widen_ranges"]
