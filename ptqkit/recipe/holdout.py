"""Held-out calibration samples and how a candidate model is scored on them, without labels.

:func:`split` keeps the first ``1 - holdout`` share of the calibration data for calibration and
the rest for scoring: whole batches when there are at least two (at least one batch on each
side), otherwise the samples of the only batch (at least one sample on each side).

:class:`HoldOut` runs the float model once over the held-out batches and keeps its outputs; each
candidate is then scored against them (the labels, if any, are never used):

* ``agreement``: top-1 agreement with the float model, ``100 · mean(argmax f(x) == argmax q(x))``
  (one prediction per sample of a ``[N, C]`` output, per position of ``[N, C, ...]``; equal
  elements for an integer/bool output);
* ``kl``: ``KL(p‖q) = Σ_c p_c (log p_c - log q_c)``, ``p = softmax(f(x))``, ``q = softmax(q(x))``,
  mean per sample (nats; ``None`` for an integer output);
* ``sqnr_db``: output SQNR ``10·log10(Σ f(x)² / Σ (f(x) - q(x))²)`` (``None`` for an integer
  output; capped at :data:`MAX_SQNR_DB` when the outputs are equal).

Which loss decides is a :data:`RANKINGS` entry: ``"agreement"`` and ``"kl"`` compare the
per-sample KL, ``"sqnr"`` the per-sample squared error (and the reported SQNR); a candidate is
taken only when it is significantly better, paired, than the best so far and not worse than the
base recipe (:meth:`HoldOut.judge`, :mod:`ptqkit.recipe.decide`). ``"auto"`` takes
``agreement`` for ``[N, classes]`` scores and integer predictions, ``sqnr`` otherwise (the rule
of the one scorer, :mod:`ptqkit.scorer`, so that the fallback and the recipe agree).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..capture.state import hold, release
from ..data import batch_size, fresh_inputs, model_device, run_model, split_batch, to_device
from ..errors import ConfigError, DataError
from ..scorer import OutputSelector, compare, db_ratio, is_discrete, kind, nonfinite_message, select
from ..sync import active, add_up, exchange
from .decide import MIN_PAIRS, Verdict, judge

#: SQNR reported when the quantized output equals the float one
MAX_SQNR_DB = 200.0


def _n_samples(batch: Any, index: int) -> int:
    return batch_size(*split_batch(batch, index))


def _slice(batch: Any, lo: int, hi: int, n: int) -> Any:
    """Samples ``lo:hi`` of a batch: every tensor whose first dim is ``n`` is sliced."""
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi] if batch.dim() > 0 and batch.shape[0] == n else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(b, lo, hi, n) for b in batch)
    if isinstance(batch, dict):
        return {k: _slice(v, lo, hi, n) for k, v in batch.items()}
    return batch


def split(
    batches: Sequence[Any], holdout: float, min_calib: int = 0
) -> tuple[list[Any], list[Any]]:
    """``(calibration, held_out)``: the last ``holdout`` share of ``batches`` held out (see the
    module docstring). :class:`DataError` when one side would be empty.

    With ``min_calib``: when whole batches would leave the calibration side under
    ``min_calib`` samples but the data has ``min_calib`` plus :data:`~.decide.MIN_PAIRS` to
    spare, the split is made by samples instead (the batch at the boundary cut in two), so that
    every trial is calibrated on ``min_calib`` (128 samples in 8 batches of 16: 100 calibrate,
    28 are held out, rather than 96 and 32 and a model calibrated on 96)."""
    cal, held = _split(batches, holdout)
    n_cal = sum(_n_samples(b, i) for i, b in enumerate(cal))
    n_all = n_cal + sum(_n_samples(b, i) for i, b in enumerate(held))
    if n_cal >= min_calib or n_all < min_calib + MIN_PAIRS:
        return cal, held
    keep = min(max(min_calib, round((1 - holdout) * n_all)), n_all - MIN_PAIRS)
    cal, held, seen = [], [], 0
    for i, b in enumerate(batches):
        n = _n_samples(b, i)
        if seen + n <= keep:
            cal.append(b)
        elif seen >= keep:
            held.append(b)
        else:  # the boundary: its first samples calibrate, the rest are held out
            k = keep - seen
            cal.append(_slice(b, 0, k, n))
            held.append(_slice(b, k, n, n))
        seen += n
    return cal, held


def _split(batches: Sequence[Any], holdout: float) -> tuple[list[Any], list[Any]]:
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
        raise ConfigError(f"holdout must be a share in (0, 1), got {holdout!r}")
    batches = list(batches)
    if not batches:
        raise DataError("the data is empty: no batch to calibrate on or score with")
    if len(batches) >= 2:
        k = min(max(round(holdout * len(batches)), 1), len(batches) - 1)
        return batches[:-k], batches[-k:]
    n = _n_samples(batches[0], 0)
    if n < 2:
        raise DataError(
            "tune needs calibration samples and held-out samples to score the recipes on, but "
            f"the data is one batch of {n} sample; give at least 2 samples (better: 100+ in "
            "several batches)"
        )
    k = min(max(round(holdout * n), 1), n - 1)
    return [_slice(batches[0], 0, n - k, n)], [_slice(batches[0], n - k, n, n)]


@dataclass(frozen=True)
class Score:
    """One candidate measured on the held-out samples (``None``: not defined for this output)."""

    agreement: float | None
    kl: float | None
    sqnr_db: float | None
    #: per held-out prediction (row), whether it equals the float model's (paired comparisons)
    hits: torch.Tensor | None = field(default=None, compare=False, repr=False)
    #: per held-out sample, its loss (KL, or squared error for ``sqnr``): what
    #: :mod:`ptqkit.recipe.decide` compares, paired
    losses: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, float | None]:
        r = lambda v: None if v is None or math.isnan(v) else float(f"{v:.6g}")  # noqa: E731
        return {"agreement": r(self.agreement), "kl": r(self.kl), "sqnr_db": r(self.sqnr_db)}


def _none(v: float | None, worst: float) -> float:
    return worst if v is None or math.isnan(v) else v


#: ranking name -> sort key (larger is better)
RANKINGS: dict[str, Callable[[Score], tuple[float, ...]]] = {
    "agreement": lambda s: (_none(s.agreement, -1.0), -_none(s.kl, math.inf)),
    "kl": lambda s: (-_none(s.kl, math.inf), _none(s.agreement, -1.0)),
    "sqnr": lambda s: (_none(s.sqnr_db, -math.inf),),
}


def decisive(a: Score, b: Score, samples: int) -> bool | None:
    """Whether ``a``'s agreement is significantly higher (``True``) or lower (``False``) than
    ``b``'s on the same held-out predictions, ``None`` when the difference is not significant.

    Paired sign test (McNemar, normal approximation at about 95 %): of the ``n`` predictions
    where exactly one of the two agrees with the float model, ``k`` favour ``a``; significant
    when ``|2k - n| > 2·√n`` (and more than one prediction apart). With 32 held-out samples a
    lead of 4 or fewer samples is never significant. Without the per-prediction hits (scores
    made elsewhere), a difference of more than one sample is taken as significant."""
    ga, gb = _none(a.agreement, -1.0), _none(b.agreement, -1.0)
    if a.hits is None or b.hits is None or a.hits.shape != b.hits.shape:
        return None if abs(ga - gb) <= 100.0 / samples + 1e-9 else ga > gb
    only_a = int((a.hits & ~b.hits).sum())
    only_b = int((b.hits & ~a.hits).sum())
    lead, n = only_a - only_b, only_a + only_b
    if abs(lead) <= 1 or abs(lead) <= 2.0 * math.sqrt(n):
        return None
    return lead > 0


class HoldOut:
    """The float model's outputs on the held-out batches, computed once; :meth:`score` runs a
    candidate on the same inputs."""

    def __init__(
        self, model: nn.Module, batches: list[Any], ranking: str, output: OutputSelector = None
    ) -> None:
        self.batches, self.output = batches, output
        self.inputs = [split_batch(b, i) for i, b in enumerate(batches)]
        self.reference = self._outputs(model, "float")
        # the samples that can be scored: a non-finite input or float output is left out
        pairs = [
            compare(f, f, batch_size(a, k), (a, k))
            for (a, k), f in zip(self.inputs, self.reference, strict=True)
        ]
        self.samples = sum(batch_size(a, k) for a, k in self.inputs)  # this rank's
        # under torch.distributed every rank scores on its own held-out samples and the scores
        # are summed over the ranks (:meth:`score`): the samples they are means over
        sums = {"n": round(sum(p.samples for p in pairs))}
        sums.update(bad_in=sum(p.bad_input for p in pairs), bad_f=sum(p.bad_float for p in pairs))
        total = add_up("tune: held-out samples", sums)
        self.total = int(total["n"])
        #: the warning for held-out samples left out (``None`` when every one is scored)
        self.excluded = nonfinite_message(int(total["bad_in"]), int(total["bad_f"]), 0, self.total)
        if self.total == 0:
            raise DataError(f"no held-out sample can be scored: {self.excluded}")
        ref = self.reference[0]
        classes = ref.dim() >= 2 and ref.shape[1] > 1  # one score per class (per position)
        if ranking == "auto":
            ranking = "sqnr" if kind(ref) == "values" else "agreement"
        if ranking not in RANKINGS:
            raise ConfigError(f"unknown score {ranking!r}; use 'auto' or one of {sorted(RANKINGS)}")
        if is_discrete(ref) and ranking != "agreement":
            raise ConfigError(
                f"score={ranking!r} needs float outputs, but the model returns {ref.dtype} "
                "predictions; use score='agreement' or select a float output with output=..."
            )
        if ranking in ("agreement", "kl") and not is_discrete(ref) and not classes:
            raise ConfigError(
                f"score={ranking!r} needs class scores ([N, classes]); the model returns "
                f"{tuple(ref.shape)}: use score='sqnr'"
            )
        self.ranking = ranking

    def _outputs(self, model: nn.Module, who: str) -> list[torch.Tensor]:
        was = model.training
        with contextlib.suppress(NotImplementedError):
            model.train(False)
        device, outs = model_device(model), []
        hold(model)  # a stateful forward: every batch from the model's state, kept as it was
        try:
            with torch.no_grad():
                for i, (args, kwargs) in enumerate(self.inputs):
                    a, k = to_device(*fresh_inputs(args, kwargs), device)
                    outs.append(select(run_model(model, i, a, k), self.output, who))
        finally:
            release(model)
            with contextlib.suppress(NotImplementedError):
                model.train(was)
        return outs

    def score(self, qmodel: nn.Module) -> Score:
        """The candidate's scores against the float outputs (:func:`ptqkit.scorer.compare`,
        the rule evaluate, sensitivity and the fallback use); a held-out sample with a
        non-finite input or float output is left out of every candidate's score alike."""
        agree = kl = signal = noise = 0.0
        hits, losses = [], []
        for (args, kwargs), f, q in zip(
            self.inputs, self.reference, self._outputs(qmodel, "quantized"), strict=True
        ):
            if f.shape != q.shape:
                raise DataError(
                    f"the float model returned {tuple(f.shape)} but the quantized model "
                    f"{tuple(q.shape)} on the same held-out batch"
                )
            p = compare(f, q, batch_size(args, kwargs), (args, kwargs))
            hits.append(p.hits.cpu())
            losses.append(p.sample_err if self.ranking == "sqnr" else p.sample_kl)
            agree, kl = agree + p.agree, kl + p.kl
            signal, noise = signal + p.signal, noise + p.noise
        every, per = torch.cat(hits), torch.cat(losses)
        if active():  # the same sums, and the same per-sample hits in rank order, on every rank
            mine = {"agree": agree, "kl": kl, "signal": signal, "noise": noise}
            rows = exchange("tune: score", {**mine, "hits": every, "losses": per})
            agree, kl, signal, noise = (
                sum(r[k] for r in rows) for k in ("agree", "kl", "signal", "noise")
            )
            every = torch.cat([r["hits"] for r in rows])
            per = torch.cat([r["losses"] for r in rows])
        if is_discrete(self.reference[0]):
            return Score(100.0 * agree / self.total, None, None, every, per)
        sqnr = min(db_ratio(max(signal, 1e-300), noise), MAX_SQNR_DB)
        return Score(100.0 * agree / self.total, kl / self.total, sqnr, every, per)

    def judge(self, new: Score, incumbent: Score, base: Score) -> Verdict:
        """Whether ``new`` replaces ``incumbent``: its per-sample losses significantly lower
        than the incumbent's and not significantly higher than the ``base``'s, and its top-1
        agreement not significantly lower than either's (:mod:`ptqkit.recipe.decide`). On
        EfficientNet-Lite0 with 32 held-out crops, recipes 1–2 crops apart were repeatedly
        ordered the other way on 1,000 other crops, and taking the lower mean KL on a tie of
        agreement walked the demo from the base recipe (100 %) through two ties to one at
        93.75 %: ties now keep the incumbent."""
        agreement_ok = all(
            decisive(new, other, self.total) is not False for other in (incumbent, base)
        )
        if new.losses is None or incumbent.losses is None or base.losses is None:
            raise DataError("a held-out score without per-sample losses cannot be compared")
        return judge(new.losses, incumbent.losses, base.losses, agreement_ok)
