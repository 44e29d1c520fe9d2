"""``ptqkit`` on the command line: ``demo``, ``quantize``, ``compare``, ``report``.

This is the only part of ptqkit that prints. The commands parse their arguments
(:mod:`.parser`), read the user's model, data and config (:mod:`.inputs_model`,
:mod:`.inputs_data`, :mod:`.config_file`), call :func:`ptqkit.run_job` and print what it returns
(:mod:`.commands`). Results go to stdout; progress, step logs and warnings go to stderr
(:mod:`.console`; nothing with ``--quiet``). Exit codes: 0 success, 2 usage error (bad arguments,
files or config), 1 failure while running, each with a one-line reason (the traceback only with
``--debug``).
"""

from __future__ import annotations

from .entry import main

__all__ = ["main"]
