"""How the ``ptqkit`` command fails: :class:`UsageError` (a bad argument, input file or config:
exit code 2) and :class:`AllRunsFailed` (exit code 1), each shown as one line."""

from __future__ import annotations

from ..errors import PTQError, one_line

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A bad argument, input file or config (the CLI exits with code 2)."""


class AllRunsFailed(PTQError):
    """Every run of a command failed (e.g. every method of ``compare``): exit code 1."""


__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "AllRunsFailed", "UsageError", "one_line"]
