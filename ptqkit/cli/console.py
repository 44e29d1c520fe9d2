"""Where the ``ptqkit`` command writes: results to stdout; progress, step logs and warnings to
stderr (plain lines; nothing with ``--quiet``). :class:`Console` is also the
:class:`~ptqkit.job.JobLog` the commands hand to :func:`ptqkit.run_job`; ptqkit's warnings
(:class:`~ptqkit.errors.PTQWarning`) and log records are routed to it as one line each."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Iterator

from ..errors import PTQWarning


class Console:
    """Where the CLI writes: results to stdout, logs and warnings to stderr."""

    def __init__(self, quiet: bool = False, debug: bool = False) -> None:
        self.quiet, self.debug = quiet, debug
        self._seen: set[str] = set()

    def out(self, text: str = "") -> None:
        print(text, flush=True)

    def log(self, message: str) -> None:
        if not self.quiet:
            print(f"ptqkit: {message}", file=sys.stderr, flush=True)

    def warn(self, text: str) -> None:
        if text not in self._seen and not self.quiet:
            self._seen.add(text)
            print(f"ptqkit: warning: {text}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.log(f"{what} ...")
        t0 = time.perf_counter()
        yield
        self.log(f"{what}: done in {time.perf_counter() - t0:.1f} s")


@contextlib.contextmanager
def warnings_to(console: Console) -> Iterator[None]:
    """Show ptqkit's warnings as one line each (once); hide other libraries' unless --debug."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PTQWarning):
            console.warn(str(message))
        elif console.debug:
            console.log(f"{category.__name__}: {message} ({filename}:{lineno})")

    with warnings.catch_warnings():
        warnings.simplefilter("always", PTQWarning)
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def logging_to(console: Console) -> Iterator[None]:
    """Show ptqkit's log records (e.g. the zoo training a model) as plain lines on stderr."""
    log = logging.getLogger("ptqkit")
    if console.quiet:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ptqkit: %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if console.debug else logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)

