"""One batch of :func:`ptqkit.evaluate`: both models run on it, the scorer pairs their outputs
(:func:`ptqkit.scorer.compare`), and the batch adds to the sums evaluate divides at the end:

* ``score_f``, ``score_q``: the metric's hits (``top1``/``top5``) or ``metric(outputs, targets)``
  times the batch's scored samples;
* ``agree``: samples whose top-1 predictions are equal; ``kl``: the summed per-sample
  ``KL(softmax(f(x)) ‖ softmax(q(x)))`` (``nan`` for integer/bool outputs);
* ``samples``: the scored samples, and those left out (non-finite input or outputs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import batch_size, batch_target, iter_batches, model_device, run_model, to_device
from ..errors import DataError
from ..scorer import (
    OutputSelector,
    Pair,
    as_rows,
    compare,
    discrete_hits,
    is_discrete,
    select,
    take,
    topk_hits,
)
from .range_coverage import CoverageMeter


@dataclass
class Sums:
    """What :func:`evaluate` sums over the batches: both scores, agreement and KL over the
    scored samples, and the samples left out (non-finite input, float output, quantized only)."""

    score_f: float = 0.0
    score_q: float = 0.0
    agree: float = 0.0
    kl: float = 0.0
    cost: float = 0.0  # expected top-1 cost (:func:`ptqkit.scorer.expected_cost`)
    samples: float = 0.0
    bad: tuple[int, int, int] = (0, 0, 0)

    def add(self, batch: tuple[tuple[float, float, float, float], Pair]) -> None:
        (f, q, same, kl_sum), p = batch
        self.score_f += f
        self.score_q += q
        self.agree += same
        self.kl += kl_sum
        self.cost += p.cost
        self.samples += p.samples
        b = self.bad
        self.bad = (b[0] + p.bad_input, b[1] + p.bad_float, b[2] + p.bad_quant)


def score_batch(
    fp32_model: Any,
    qmodel: Any,
    i: int,
    batch: tuple[tuple[tuple, dict], Any],
    name: str,
    metric: Any,
    output: OutputSelector,
    meter: CoverageMeter,
) -> tuple[tuple[float, float, float, float], Pair]:
    """Both models on batch ``i``: its :func:`batch_sums` and the scorer's :class:`Pair`."""
    (args, kwargs), target = batch
    if name in ("top1", "top5") and target is None:
        raise DataError(
            f"metric {name!r} needs labels, but batch {i} has none: give "
            "(input, labels) batches, or use metric='agreement' to compare the "
            "two models without labels"
        )
    raw_f = select(call(fp32_model, i, args, kwargs), output, "float")
    if isinstance(qmodel, nn.Module):
        args, kwargs = to_device(args, kwargs, model_device(qmodel))
        meter.set_inputs(args, kwargs)
    raw_q = select(call(qmodel, i, args, kwargs), output, "quantized")
    if raw_f.shape != raw_q.shape or is_discrete(raw_f) != is_discrete(raw_q):
        raise DataError(
            f"batch {i}: the float model returned {tuple(raw_f.shape)} "
            f"{raw_f.dtype} but the quantized model {tuple(raw_q.shape)} {raw_q.dtype}"
        )
    p = compare(raw_f, raw_q, batch_size(args, kwargs), (args, kwargs))
    return batch_sums(name, metric, p, take(target, p.keep)), p


def batch_sums(name: str, metric: Any, p: Pair, target: Any) -> tuple[float, float, float, float]:
    """``(score_f, score_q, agreement, KL)`` sums of one batch (:func:`ptqkit.scorer.compare`
    made ``p``: its scored samples only, each prediction row weighing ``samples / rows``)."""
    ns = p.samples
    if not ns:  # every sample of the batch left out (non-finite)
        return 0.0, 0.0, 0.0, 0.0
    if is_discrete(p.f):
        return discrete_sums(name, metric, p, target)
    if name == "agreement":
        return ns, p.agree, p.agree, p.kl
    if name in ("top1", "top5"):
        out_f, out_q = as_rows(p.f), as_rows(p.q)
        k, w = (1 if name == "top1" else 5), ns / out_f.shape[0]
        hits_f, hits_q = topk_hits(out_f, target, k), topk_hits(out_q, target, k, p.q_ok)
        return hits_f * w, hits_q * w, p.agree, p.kl
    return float(metric(p.f, target)) * ns, float(metric(p.q, target)) * ns, p.agree, p.kl


def discrete_sums(
    name: str, metric: Any, p: Pair, target: Any
) -> tuple[float, float, float, float]:
    """The same sums for integer/bool outputs, compared by equality (KL is ``nan``)."""
    ns = p.samples
    if name == "agreement":
        return ns, p.agree, p.agree, math.nan
    if name == "top5":
        raise DataError(
            f"top5 needs class scores, but the models return {p.f.dtype} predictions; use "
            "metric='top1' or 'agreement', or select a float output with output=..."
        )
    if name == "top1":
        (hits_f, count), (hits_q, _) = discrete_hits(p.f, target), discrete_hits(p.q, target)
        return hits_f * ns / count, hits_q * ns / count, p.agree, math.nan
    return float(metric(p.f, target)) * ns, float(metric(p.q, target)) * ns, p.agree, math.nan


def with_targets(data: Iterable[Any]) -> Iterable[tuple[int, tuple[Any, Any]]]:
    """``(index, ((args, kwargs), target))`` for each batch, validated by :func:`iter_batches`."""
    if isinstance(data, (torch.Tensor, dict)) or not isinstance(data, Iterable):
        yield from iter_batches(data)  # raises the DataError that says what to pass instead
        return
    batches: list[Any] = []

    def raw() -> Iterable[Any]:
        for b in data:
            batches.append(b)
            yield b

    for i, split in iter_batches(raw(), None):
        target = batch_target(batches.pop())
        yield i, (split, target)


def call(model: Any, index: int, args: tuple, kwargs: dict) -> Any:
    if isinstance(model, nn.Module):
        args, kwargs = to_device(args, kwargs, model_device(model))
    elif not callable(model):
        raise DataError(f"a model must be an nn.Module or a callable, got {type(model).__name__}")
    return run_model(model, index, args, kwargs)
