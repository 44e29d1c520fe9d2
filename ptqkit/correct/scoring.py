"""Scoring a quantized model against its float original on data, pass by pass: the metric
(top-1 accuracy with labels, top-1 agreement with the float network otherwise, output SQNR for
outputs that are not ``[N, classes]`` logits or integer predictions) with some quantizers or
layers switched. Used by the float fallback (:mod:`.fallback`) and the sensitivity analysis
(:mod:`ptqkit.analysis.sensitivity`).

The output is selected and compared as :func:`ptqkit.evaluate` does (:mod:`ptqkit.scorer`, the
one scorer): the same tensor of a tuple/dict output, integer/bool outputs (an ``argmax``)
compared by equality (their SQNR is ``nan``: the SQNR of class indices means nothing), samples
with a non-finite input or float output left out (counted in :attr:`Evaluator.excluded`).

SQNR: ``10·log10(Σ y² / Σ (y - ŷ)²)`` dB.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PTQConfig
from ..data import (
    batch_size,
    batch_target,
    fresh_inputs,
    model_device,
    run_model,
    split_batch,
    to_device,
)
from ..errors import DataError
from ..quant.modules import float_mode
from ..scorer import OutputSelector, Pair, compare, db_ratio, kind, predictions, select, take
from .units import precision

#: bytes of layer outputs kept at once by the per-layer SQNR pass
SQNR_BUDGET = 256 * 2**20


@dataclass
class Score:
    """What one pass measured: ``metric`` (see :attr:`Evaluator.metric_name`), top-1
    ``agreement`` with the float network, ``accuracy`` (``None`` without labels) and the output
    ``sqnr_db`` (``nan`` for integer/bool outputs)."""

    metric: float
    agreement: float | None
    accuracy: float | None
    sqnr_db: float


def _labeled(ref: torch.Tensor, target: Any) -> bool:
    """Whether ``target`` holds one label per prediction of ``ref``."""
    if not isinstance(target, torch.Tensor):
        return False
    return target.shape == (ref.shape if kind(ref) == "discrete" else ref.shape[:1])


def _label_hits(pair: Pair, target: Any, out: torch.Tensor) -> float:
    """Samples' worth of predictions of ``out`` (``pair.f`` or ``pair.q``) equal to the labels."""
    pred = predictions(out).reshape(-1)
    t = take(target, pair.keep).reshape(-1).to(pred.device)
    if not pred.numel():
        return 0.0
    ok = (pred == t) & (pair.q_ok if out is pair.q else True)
    return float(ok.sum()) * pair.samples / pred.numel()


class Evaluator:
    """Runs the quantized model (in some precision state) over ``data`` against the float
    reference, which is computed once and reused (recomputed for a batch whose input changed,
    e.g. a shuffling loader)."""

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        config: PTQConfig,
        output: OutputSelector = None,
        api: str | None = None,
    ) -> None:
        self.model, self.data, self.config = model, data, config
        self.output, self.api = output, api
        self.device = model_device(model)
        self._ref: dict[int, tuple[tuple, torch.Tensor]] = {}
        self.passes = 0
        labels, classes, n, correct, bad_in, bad_f = True, True, 0.0, 0.0, 0, 0
        discrete = False
        for _, (args, kwargs), out, target in self._batches(reference=True):
            p = compare(out, out, batch_size(args, kwargs), (args, kwargs))
            classes &= kind(out) != "values"
            discrete |= kind(out) == "discrete"
            labels &= _labeled(out, target)
            if labels and classes:
                correct += _label_hits(p, target, p.f)
            n, bad_in, bad_f = n + p.samples, bad_in + p.bad_input, bad_f + p.bad_float
        # a part of the data without samples (a rank's empty shard) does not vote on the kind
        votes: dict[str, float] = {"n": n, "correct": correct, "bad_in": bad_in, "bad_f": bad_f}
        votes.update(no_labels=int(n > 0 and not labels), no_classes=int(n > 0 and not classes))
        votes.update(discrete=int(n > 0 and discrete))
        total = self._total("float reference", votes)
        #: integer/bool outputs: compared by equality, no SQNR
        self.discrete = total["discrete"] > 0
        n, correct = total["n"], total["correct"]
        labels, classes = total["no_labels"] == 0, total["no_classes"] == 0
        #: samples left out of every score: ``(non-finite input, non-finite float output)``
        self.excluded = (int(total["bad_in"]), int(total["bad_f"]))
        if n == 0:
            if any(self.excluded):
                raise DataError(
                    f"no sample can be scored{self._where}: {self.excluded[0]} have a NaN/Inf "
                    f"input and on {self.excluded[1]} the float model itself returns NaN/Inf"
                )
            raise DataError(f"the data is empty{self._where}: nothing to evaluate on")
        self.samples = round(n)
        self.metric_name = ("accuracy" if labels else "agreement") if classes else "sqnr_db"
        self.float_metric = (
            100.0 * correct / n
            if self.metric_name == "accuracy"
            else (100.0 if classes else float("inf"))
        )

    @staticmethod
    def _fingerprint(args: tuple, kwargs: dict) -> tuple:
        ts = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        return tuple((tuple(t.shape), float(t.double().sum())) for t in ts)

    def _run(self, i: int, args: tuple, kwargs: dict, who: str) -> torch.Tensor:
        out = run_model(self.model, i, *fresh_inputs(args, kwargs))
        return select(out, self.output, who, self.api)

    def _batches(self, reference: bool = False) -> Iterator[tuple]:
        """``(index, (args, kwargs), float output, target)`` per batch."""
        for i, batch in enumerate(self.data):
            if self.config.num_batches is not None and i >= self.config.num_batches:
                break
            args, kwargs = to_device(*split_batch(batch, i), self.device)
            fp = self._fingerprint(args, kwargs)
            cached = self._ref.get(i)
            if cached is None or cached[0] != fp:
                with torch.no_grad(), float_mode(self.model):
                    out = self._run(i, args, kwargs, "float")
                self._ref[i] = (fp, out.clone())  # kept: no later in-place op reaches it
            yield i, (args, kwargs), self._ref[i][1], batch_target(batch)

    def measure(self, floats: Iterable[str] = (), only: Iterable[str] | None = None) -> Score:
        """Score of the model with units ``floats`` in float (or only the units ``only``
        quantized), see :func:`precision`."""
        agree = correct = n = sig = noise = 0.0
        with torch.no_grad(), precision(self.model, floats, only):
            for i, (args, kwargs), ref, target in self._batches():
                out = self._run(i, args, kwargs, "quantized")
                if out.shape != ref.shape or out.dtype != ref.dtype:
                    raise DataError(
                        f"batch {i}: the float model returned {tuple(ref.shape)} {ref.dtype} "
                        f"but the quantized model {tuple(out.shape)} {out.dtype}"
                    )
                p = compare(ref, out, batch_size(args, kwargs), (args, kwargs))
                agree, n = agree + p.agree, n + p.samples
                if kind(ref) != "discrete":
                    sig, noise = sig + p.signal, noise + p.noise
                if self.metric_name == "accuracy":
                    correct += _label_hits(p, target, p.q)
        self.passes += 1
        local = {"agree": agree, "correct": correct, "n": n, "sig": sig, "noise": noise}
        t = self._total(f"pass {self.passes}", local)
        sqnr = math.nan if self.discrete else db_ratio(t["sig"], t["noise"])
        if self.metric_name == "sqnr_db":
            return Score(sqnr, None, None, sqnr)
        acc = 100.0 * t["correct"] / t["n"] if self.metric_name == "accuracy" else None
        agreement = 100.0 * t["agree"] / t["n"]
        return Score(acc if acc is not None else agreement, agreement, acc, sqnr)

    #: where the data is, in the empty-data error ("" for one process)
    _where = ""

    def _total(self, what: str, sums: dict[str, float]) -> dict[str, float]:
        """The sums behind a score over all the data: here, this process's own."""
        return sums


__all__ = ["Evaluator", "Score", "db_ratio"]
