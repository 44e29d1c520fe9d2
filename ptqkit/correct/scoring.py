"""Scoring a quantized model against its float original on data, pass by pass: the metric
(top-1 accuracy with labels, top-1 agreement with the float network otherwise, output SQNR for
outputs that are not ``[N, classes]`` logits) with some quantizers or layers switched. Used by
the float fallback (:mod:`.fallback`) and the sensitivity analysis
(:mod:`ptqkit.analysis.sensitivity`).

SQNR: ``10·log10(Σ y² / Σ (y - ŷ)²)`` dB.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PTQConfig
from ..data import batch_target, fresh_inputs, model_device, run_model, split_batch, to_device
from ..errors import DataError
from ..quant.modules import float_mode
from .units import precision

#: bytes of layer outputs kept at once by the per-layer SQNR pass
SQNR_BUDGET = 256 * 2**20


# -- measuring -----------------------------------------------------------------------------------
def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
            if hasattr(o, "__iter__"):
                try:
                    return first_tensor(o)
                except DataError:
                    continue
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return first_tensor(out.to_tuple())
    raise DataError(f"the model's output holds no tensor ({type(out).__name__})")


@dataclass
class Score:
    """What one pass measured: ``metric`` (see :attr:`Evaluator.metric_name`), top-1
    ``agreement`` with the float network, ``accuracy`` (``None`` without labels) and the output
    ``sqnr_db``."""

    metric: float
    agreement: float | None
    accuracy: float | None
    sqnr_db: float


class Evaluator:
    """Runs the quantized model (in some precision state) over ``data`` against the float
    reference, which is computed once and reused (recomputed for a batch whose input changed,
    e.g. a shuffling loader)."""

    def __init__(self, model: nn.Module, data: Iterable[Any], config: PTQConfig) -> None:
        self.model, self.data, self.config = model, data, config
        self.device = model_device(model)
        self._ref: dict[int, tuple[tuple, torch.Tensor]] = {}
        self.passes = 0
        labels, classes, n, correct = True, True, 0, 0
        for _, _, out, target in self._batches(reference=True):
            classes &= out.dim() == 2 and out.shape[1] > 1
            labels &= isinstance(target, torch.Tensor) and target.shape == out.shape[:1]
            if labels and classes:
                correct += int((out.argmax(1) == target.to(out.device)).sum())
            n += out.shape[0]
        # a part of the data without samples (a rank's empty shard) does not vote on the kind
        votes: dict[str, float] = {"n": n, "correct": correct}
        votes.update(no_labels=int(n > 0 and not labels), no_classes=int(n > 0 and not classes))
        total = self._total("float reference", votes)
        n, correct = int(total["n"]), int(total["correct"])
        labels, classes = total["no_labels"] == 0, total["no_classes"] == 0
        if n == 0:
            raise DataError(f"the data is empty{self._where}: nothing to evaluate on")
        self.samples = n
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
                    out = first_tensor(run_model(self.model, i, *fresh_inputs(args, kwargs)))
                self._ref[i] = (fp, out.detach().clone())  # kept: no later in-place op reaches it
            yield i, (args, kwargs), self._ref[i][1], batch_target(batch)

    def measure(self, floats: Iterable[str] = (), only: Iterable[str] | None = None) -> Score:
        """Score of the model with units ``floats`` in float (or only the units ``only``
        quantized), see :func:`precision`."""
        agree = correct = n = 0
        sig = noise = 0.0
        with torch.no_grad(), precision(self.model, floats, only):
            for i, (args, kwargs), ref, target in self._batches():
                out = first_tensor(run_model(self.model, i, *fresh_inputs(args, kwargs))).detach()
                sig += float(ref.double().pow(2).sum())
                noise += float((ref.double() - out.double()).pow(2).sum())
                if self.metric_name != "sqnr_db":
                    pred = out.argmax(1)
                    agree += int((pred == ref.argmax(1)).sum())
                    if self.metric_name == "accuracy":
                        correct += int((pred == target.to(pred.device)).sum())
                n += out.shape[0]
        self.passes += 1
        local = {"agree": agree, "correct": correct, "n": n, "sig": sig, "noise": noise}
        t = self._total(f"pass {self.passes}", local)
        sqnr = db_ratio(t["sig"], t["noise"])
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


def db_ratio(signal: float, noise: float) -> float:
    import math

    if noise <= 0:
        return float("inf")
    if signal <= 0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)


