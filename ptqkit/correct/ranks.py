"""The fallback's scores over the data of every rank (``torch.distributed``).

Each rank holds a shard of the data. :class:`RanksEvaluator` is an
:class:`~ptqkit.analysis.sensitivity.Evaluator` whose every score is computed from sums over all
the shards: samples, top-1 agreements and correct predictions (integers), and the output's signal
and noise energies ``Σ y²`` and ``Σ (y - ŷ)²`` (float64), added over the ranks in rank order
(:func:`ptqkit.sync.add_up`). Every rank therefore sees the same scores, makes the same fallback
decisions and keeps the same layers in float; the scores are those of one process over the union
of the shards (the counts exactly; the energies up to float64 rounding, as they are grouped per
rank before being added).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..config import PTQConfig
from ..data import fresh_inputs, model_device, run_model
from ..errors import DataError
from ..sync import add_up
from .scoring import Evaluator, Score, db_ratio, first_tensor
from .units import precision


class RanksEvaluator(Evaluator):
    """:class:`Evaluator` with the sums behind every score added over the ranks."""

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
        # a rank without data does not vote on the kind of output
        votes = {"n": n, "correct": correct}
        votes.update(no_labels=int(n > 0 and not labels), no_classes=int(n > 0 and not classes))
        total = add_up("fallback: float reference", votes)
        n, correct = int(total["n"]), int(total["correct"])
        labels, classes = total["no_labels"] == 0, total["no_classes"] == 0
        if n == 0:
            raise DataError("the data is empty on every rank: nothing to evaluate on")
        self.samples = n
        self.metric_name = ("accuracy" if labels else "agreement") if classes else "sqnr_db"
        self.float_metric = (
            100.0 * correct / n
            if self.metric_name == "accuracy"
            else (100.0 if classes else float("inf"))
        )

    def measure(self, floats: Iterable[str] = (), only: Iterable[str] | None = None) -> Score:
        """As :meth:`Evaluator.measure`, over the data of every rank."""
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
        t = add_up(f"fallback: pass {self.passes}", local)
        sqnr = db_ratio(t["sig"], t["noise"])
        if self.metric_name == "sqnr_db":
            return Score(sqnr, None, None, sqnr)
        acc = 100.0 * t["correct"] / t["n"] if self.metric_name == "accuracy" else None
        agreement = 100.0 * t["agree"] / t["n"]
        return Score(acc if acc is not None else agreement, agreement, acc, sqnr)


__all__ = ["RanksEvaluator"]
