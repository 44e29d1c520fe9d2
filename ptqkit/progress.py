"""Progress bars: tqdm on a terminal, nothing otherwise (the CLI logs plain lines instead)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(it: Iterable[T], enabled: bool, desc: str, total: int | None = None) -> Iterator[T]:
    """Wrap ``it`` in a tqdm bar when ``enabled`` and stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield from it
        return
    from tqdm.auto import tqdm

    yield from tqdm(it, desc=desc, total=total, leave=False, file=sys.stderr)
