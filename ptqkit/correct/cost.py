"""What AdaRound will cost, before it runs: seconds from the layers' shapes and two probes of this
machine (:func:`probe`: its matrix-product rate and its rate of elementwise work).

AdaRound's time is its optimization steps (:mod:`ptqkit.correct.adaround`): ``iters`` steps per
layer (500 by default), each of which costs, for a layer of ``|W|`` weights, ``O`` outputs and
``k`` inputs per output,

    t_step = T_OP                         the ~40 tensor operations' dispatch (a small layer)
           + 2·B·|W| / R_mm               forward product and weight gradient on ``B`` rows
             (or O·k² / R_mm)             (the Gram objective: no activation after the layer)
           + E·|W| / R_elem               soft rounding, its gradient and Adam: ~E passes
                                          over the weights, memory-bound on large layers

with ``B`` = ``rows_per_step`` (``depthwise_rows_per_step`` for a depthwise layer) and, per layer
once, the two reconstruction losses on all ``max_rows`` rows (``2·max_rows·|W|`` multiply-adds).
``B`` and the rows are upper bounds: a layer with fewer sampled rows (a classifier sees one row
per sample) steps on fewer; the estimate errs long, which for a time budget is the safe side.

Why it matters: the cost is ``iters × rows × |W|``, not the number of layers. A 19M-weight 1-D
audio CNN (15 layers, W4 per channel, 256 frames of 1,024 samples) ran 555 s of AdaRound on a
2-core AVX2 machine: each of its four 1024→1024 k=3 convs steps on 2·1,024·3.1M multiply-adds
(220 ms a step). The previous prior of :func:`ptqkit.tune` (2 ms per layer per step) expected 17 s
of it; this estimate says 619 s (the classifier's rows counted at ``B``, see above). Constants
fitted on that machine to the per-step times of every layer of that CNN and of MobileNetV2-style
(probe: 58-62 G multiply-adds/s, 0.8-1.2 ns per ``addcmul`` element): ``T_OP`` 0.2 ms, ``E`` 32
(a step allocates ~20 weight-sized tensors and makes ~30 memory-bound passes over them: on the
1024→1024 convs the elementwise work was ~40% of the step).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PTQConfig
from ..graph import activation_after
from ..quant.modules import QuantLayer, out_channels, quant_layers

#: seconds of one step's tensor-operation dispatch (what a tiny layer's step costs)
T_OP = 2e-4
#: elementwise passes over the weights per step, in units of the probed ``addcmul``
E = 32.0
#: elements of the elementwise probe (larger than the caches: big layers are memory-bound)
PROBE_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Machine:
    """Measured rates: ``mm_rate`` multiply-adds per second of a large matrix product;
    ``elem_s`` seconds per element of one ``addcmul`` over a tensor larger than the caches."""

    mm_rate: float
    elem_s: float


def _sync(device: torch.device) -> None:
    """Wait for the work queued on an accelerator (CUDA, MPS, XPU, ...: kernels run async)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeat: int = 5) -> float:
    """The median of ``repeat`` calls of ``fn`` (after one warm-up), in seconds."""
    fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return max(statistics.median(times), 1e-9)


def probe(device: torch.device | str = "cpu") -> Machine:
    """Measure this machine's rates on ``device`` with the current thread count (~0.3 s on a
    2-core CPU): a ``[512, 1024] × [1024, 512]`` product and an ``addcmul`` of
    :data:`PROBE_ELEMENTS` (4M) floats, each the median of 5 calls."""
    dev = torch.device(device)
    with torch.no_grad():
        a = torch.full((512, 1024), 0.5, device=dev)  # the values do not change the time
        b = torch.full((1024, 512), 0.5, device=dev)
        c = torch.empty(512, 512, device=dev)
        mm = _timed(lambda: torch.mm(a, b, out=c), dev)
        x, y, z, o = (torch.full((PROBE_ELEMENTS,), 0.5, device=dev) for _ in range(4))
        el = _timed(lambda: torch.addcmul(x, y, z, out=o), dev)
    return Machine(mm_rate=512 * 1024 * 512 / mm, elem_s=el / PROBE_ELEMENTS)


@dataclass(frozen=True)
class LayerWork:
    """The shape of one layer's rounding problem: ``weights`` (``|W|``), ``out`` (``O``),
    ``k`` (inputs per output), ``depthwise`` (one output per group), ``gram`` (no activation
    after it: the Gram objective applies when ``k + 1 < 2·B``)."""

    weights: int
    out: int
    k: int
    depthwise: bool
    gram: bool

    def step_s(self, rows: int, m: Machine) -> float:
        """Seconds of one optimization step on ``rows`` rows per step."""
        macs = 2 * rows * self.weights
        if self.gram and self.k + 1 < 2 * rows:
            macs = self.out * (self.k + 1) ** 2
        return T_OP + macs / m.mm_rate + E * self.weights * m.elem_s


def layer_work(qmodel: nn.Module) -> list[LayerWork]:
    """The rounding problems of ``qmodel``'s quantized layers (in module order)."""
    out = []
    for name, layer in quant_layers(qmodel).items():
        out.append(_work(layer, activation_after(qmodel, name) is None))
    return out


def _work(layer: QuantLayer, gram: bool) -> LayerWork:
    groups = int(getattr(layer.layer, "groups", 1))
    numel = int(layer.weight_fp.numel())
    o = out_channels(layer.layer)
    return LayerWork(numel, o, numel // max(o, 1), groups > 1 and groups == o, gram)


def adaround_seconds(work: list[LayerWork], config: PTQConfig, m: Machine) -> float:
    """Expected seconds of AdaRound's optimization under ``config`` (its steps and the per-layer
    losses; not the data passes, which the caller counts in its own units)."""
    opts = config.adaround_options
    total = 0.0
    for lw in work:
        rows = opts.depthwise_rows_per_step if lw.depthwise else opts.rows_per_step
        total += config.adaround_iters * lw.step_s(rows, m)
        total += 2 * opts.max_rows * lw.weights / m.mm_rate
    return total


__all__ = ["T_OP", "E", "LayerWork", "Machine", "adaround_seconds", "layer_work", "probe"]
