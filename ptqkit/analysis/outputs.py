"""Which tensor of a model's output :func:`ptqkit.evaluate` scores, and how: the rule lives in
:mod:`ptqkit.scorer` (one scorer for evaluate, sensitivity, the fallback and tune); its names
are kept here for the code that imports them from this module."""

from __future__ import annotations

from ..scorer import (
    OutputSelector,
    as_rows,
    discrete_hits,
    equal_share,
    is_discrete,
    select,
    topk_hits,
)

__all__ = [
    "OutputSelector",
    "as_rows",
    "discrete_hits",
    "equal_share",
    "is_discrete",
    "select",
    "topk_hits",
]
