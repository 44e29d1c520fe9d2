"""The fallback's scores over the data of every rank (``torch.distributed``).

Each rank holds a shard of the data. :class:`RanksEvaluator` is an
:class:`~ptqkit.correct.scoring.Evaluator` whose every score is computed from sums over all
the shards: samples, top-1 agreements and correct predictions (integers), and the output's signal
and noise energies ``Σ y²`` and ``Σ (y - ŷ)²`` (float64), added over the ranks in rank order
(:func:`ptqkit.sync.add_up`). Every rank therefore sees the same scores, makes the same fallback
decisions and keeps the same layers in float; the scores are those of one process over the union
of the shards (the counts exactly; the energies up to float64 rounding, as they are grouped per
rank before being added).
"""

from __future__ import annotations

from ..sync import add_up
from .scoring import Evaluator


class RanksEvaluator(Evaluator):
    """:class:`Evaluator` with the sums behind every score added over the ranks."""

    _where = " on every rank"

    def _total(self, what: str, sums: dict[str, float]) -> dict[str, float]:
        """The sums added over the ranks, in rank order (the same on every rank)."""
        return add_up(f"fallback: {what}", sums)


__all__ = ["RanksEvaluator"]
