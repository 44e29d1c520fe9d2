"""Torch's intra-op thread count for one block of small tensor operations.

A loop of many small operations (an AdaRound step: ~40 operations of 10³-10⁶ elements; a GPTQ
column: ~10 operations of ``O`` to ``O·B`` elements) waits, with several threads, for every
thread at each parallel operation; on a loaded machine that wait dominates. The callers choose
one thread by the size of the work only, so a result never depends on the machine's load (see
:func:`ptqkit.correct.adaround.round_layer` and :mod:`ptqkit.correct.gptq_solve` for what
they measured).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Within the block, torch's intra-op threads are ``n`` (unchanged for ``None`` or the
    current count); the caller's count is restored on exit, also after an error."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


__all__ = ["threads"]
