"""``main``: parse the arguments, run the command, turn its failure into an exit code and one
line on stderr (the traceback only with ``--debug``)."""

from __future__ import annotations

import sys
import traceback

from ..errors import PTQError
from .console import Console, logging_to, warnings_to
from .parser import build_parser
from .usage import EXIT_FAILURE, EXIT_USAGE, UsageError, one_line

#: arguments that must be >= 1 when given
POSITIVE = (
    "batch_size",
    "limit",
    "resize",
    "crop",
    "calibration_samples",
    "eval_samples",
    "max_plots",
    "threads",
)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ptqkit`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a usage line on bad arguments
    console = Console(args.quiet, args.debug)
    for name in POSITIVE:
        v = getattr(args, name, None)
        if v is not None and v < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        with warnings_to(console), logging_to(console):
            return args.func(args, console)
    except UsageError as e:
        if console.debug:
            traceback.print_exc()
        print(f"ptqkit {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ptqkit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if console.debug:
            traceback.print_exc()
        kind = "" if isinstance(e, PTQError) else f"{type(e).__name__}: "
        hint = "" if console.debug else " (run with --debug for the traceback)"
        print(f"ptqkit {args.command}: error: {kind}{one_line(e)}{hint}", file=sys.stderr)
        return EXIT_FAILURE
