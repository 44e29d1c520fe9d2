"""Calibration coverage: does the calibrated range of each activation quantizer hold the
evaluation data?

A quantizer of scale ``s`` and zero point ``z`` on the grid ``[qmin, qmax]`` represents
``[lo, hi] = [(qmin - z)·s, (qmax - z)·s]``; a value ``x`` beyond it is clipped. Values within
half a step of the grid's ends round to its ends anyway, so a value counts as *outside* when
its overshoot ``o(x) = x - clamp(x, lo - s/2, hi + s/2)`` is not zero. During the evaluation
pass (forward pre-hooks on every calibrated :class:`~ptqkit.quant.modules.ActQuant` in
``"quant"`` mode: no extra pass), :class:`CoverageMeter` accumulates per quantizer

* ``outside``: the share of its input values with ``o(x) > 0``;
* ``overshoot``: ``max |o(x)| / (hi - lo)``, how far beyond the range, in range widths;
* ``clip_to_round``: the clipping error energy against the rounding error energy,
  ``mean(o(x)²) / (s²/12)`` (``s²/12``: the mean squared error of rounding to a uniform grid).

A quantizer is **saturated** when ``outside >= SATURATION_SHARE`` (0.1 %) *and*
``clip_to_round >= SATURATION_ENERGY`` (10): clipping then costs at least ten times what the
grid's rounding costs, on more than one value in a thousand. A calibrator that clips on purpose
(percentile, MSE, KL) stays below: by construction it trades clipping error against rounding
error of the same order, on the data it saw. Evaluation data that is not like the calibration
data (shifted, scaled, another domain) crosses both thresholds.

The remedy is to calibrate on data drawn like the real inputs; an opt-in headroom,
``PTQConfig(range_margin=m)``, widens every calibrated range by ``m·(hi - lo)`` on each side
(:func:`ptqkit.calibrate.margin.widen_ranges`), at the price of a ``1 + 2m`` times coarser
step (rounding noise ``(1 + 2m)²`` times larger on in-distribution data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: share of evaluation values outside the range above which a quantizer may be saturated
SATURATION_SHARE = 1e-3
#: clipping/rounding error energy ratio above which a quantizer may be saturated
SATURATION_ENERGY = 10.0


@dataclass(frozen=True)
class Coverage:
    """How the evaluation values of one activation quantizer fit its calibrated range."""

    label: str
    values: int
    outside: float
    overshoot: float
    clip_to_round: float
    #: it quantizes an input of the model itself (no quantization error upstream)
    model_input: bool = False

    @property
    def saturated(self) -> bool:
        return self.outside >= SATURATION_SHARE and self.clip_to_round >= SATURATION_ENERGY


def _grid(q: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lo, hi, step)`` of ``q``'s grid, broadcastable to ``x``."""
    s = q.scale.detach().float().to(x.device)
    z = q.zero_point.detach().float().to(x.device)
    if s.dim() > 0 and x.dim() > 0:
        shape = [1] * x.dim()
        shape[q.spec.axis % x.dim()] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return (q.spec.qmin - z) * s, (q.spec.qmax - z) * s, s


class _Tally:
    def __init__(self, quant: Any, inputs: set[int]) -> None:
        self.quant = quant
        self.inputs = inputs
        self.model_input = False
        self.n = 0
        self.out: torch.Tensor | float = 0.0
        self.sq: torch.Tensor | float = 0.0
        self.max: torch.Tensor | float = 0.0
        self.step_sq = 0.0
        # (device, dims) -> (lo - s/2, hi + s/2, width, mean step²)
        self._grid: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = {}

    def grid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """The clipping bounds and the range width, computed once per device and rank (the
        quantizer's scale does not change during an evaluation)."""
        key = (x.device, x.dim())
        if key not in self._grid:
            lo, hi, s = _grid(self.quant, x)
            self._grid[key] = (lo - s / 2, hi + s / 2, hi - lo, float(s.square().mean()))
        return self._grid[key]

    def __call__(self, module: nn.Module, inputs: tuple) -> None:
        x = inputs[0] if inputs else None
        if module.mode != "quant" or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return
        self.model_input = self.model_input or id(x) in self.inputs
        x = x.detach()
        lo, hi, width, step_sq = self.grid(x)
        self.n += x.numel()
        self.step_sq += step_sq * x.numel()
        if x.device.type == "cpu" and lo.dim() == 0:  # fast path: most batches fit the range
            mn, mx = x.aminmax()
            if mn >= lo and mx <= hi:
                return
        x = x.float()
        over = x - x.clamp(lo, hi)  # signed overshoot, 0 inside
        self.out = self.out + torch.count_nonzero(over)
        self.sq = self.sq + over.square().sum()
        worst = (over.abs().amax() / width) if width.dim() == 0 else (over.abs() / width).amax()
        self.max = torch.maximum(torch.as_tensor(self.max, device=x.device), worst)

    def result(self) -> Coverage:
        label = self.quant.label
        if not self.n:
            return Coverage(label, 0, 0.0, 0.0, 0.0, self.model_input)
        noise = self.step_sq / 12.0
        return Coverage(
            label,
            self.n,
            float(self.out) / self.n,
            float(self.max),
            float(self.sq) / noise if noise > 0 else 0.0,
            self.model_input,
        )


class CoverageMeter:
    """Context manager: hooks every calibrated activation quantizer of ``model`` and measures
    its :class:`Coverage` on what the model computes inside the block. A model without
    quantizers (an ONNX Runtime session, a plain callable) measures nothing."""

    def __init__(self, model: Any) -> None:
        from ..quant.modules import act_quants

        quants = act_quants(model) if isinstance(model, nn.Module) else {}
        self._inputs: set[int] = set()
        self._tallies = {n: _Tally(q, self._inputs) for n, q in quants.items() if q.calibrated}
        self._handles: list[Any] = []

    def set_inputs(self, args: tuple, kwargs: dict) -> None:
        """The tensors the model is about to be called with (on its device): a quantizer that
        receives one of them quantizes a model input."""
        self._inputs.clear()
        self._inputs.update(id(t) for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))

    def __enter__(self) -> CoverageMeter:
        for tally in self._tallies.values():
            self._handles.append(tally.quant.register_forward_pre_hook(tally))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def results(self) -> dict[str, Coverage]:
        """``{quantizer name: Coverage}`` of the quantizers that saw values."""
        return {n: t.result() for n, t in self._tallies.items() if t.n}


def saturated(coverage: dict[str, Any]) -> list[tuple[str, Coverage]]:
    """The saturated quantizers of ``coverage`` (``Coverage`` or its dict), worst first."""
    items = [(n, c if isinstance(c, Coverage) else Coverage(**c)) for n, c in coverage.items()]
    bad = [(n, c) for n, c in items if c.saturated]
    return sorted(bad, key=lambda nc: -nc[1].outside)


def coverage_message(coverage: dict[str, Any], shown: int = 3) -> str | None:
    """The advice when some quantizers are saturated, naming them; ``None`` otherwise."""
    bad = saturated(coverage)
    if not bad:
        return None
    worst = "; ".join(
        f"{c.label or n}: {100 * c.outside:.2g}% of values outside, up to "
        f"{c.overshoot:.2g}x the range width beyond it"
        for n, c in bad[:shown]
    )
    more = f" and {len(bad) - shown} more" if len(bad) > shown else ""
    remedy = (
        "give the ranges headroom (PTQConfig(range_margin=0.25): coarser steps, more rounding "
        "noise in distribution)"
    )
    if any(c.model_input for _, c in bad):
        return (
            f"the calibration data does not represent the evaluation data: {len(bad)} "
            f"activation quantizer(s) saturate, the model's input among them ({worst}{more}); "
            f"calibrate on samples drawn like the evaluation inputs, or {remedy}"
        )
    return (
        f"{len(bad)} activation quantizer(s) saturate on the evaluation data while the "
        f"model's inputs stay within their calibrated range ({worst}{more}): the quantization "
        "error of the layers before them shifts their inputs, or the evaluation data differs "
        "from the calibration data inside the network; reduce the upstream error (see the "
        f"other advice), calibrate on samples drawn like the evaluation inputs, or {remedy}"
    )

