"""``package.module:callable`` specs (``--model``, ``--data``): import the module, with the
current folder searched after the installed packages, and call the callable. This runs the user's
code: the ``--help`` of the commands says so."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from .usage import UsageError, one_line


def import_attr(spec: str, flag: str) -> Any:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise UsageError(f"{flag} {spec!r}: expected package.module:callable")
    # the current folder goes LAST: a local onnx.py, safetensors.py, ... must not shadow the
    # installed package of that name (for ptqkit's own imports as for the user's); `python -m`
    # and `python -c` put it first ("" or its path), so it is moved
    cwd = os.getcwd()
    for entry in ("", ".", cwd):
        while entry in sys.path:
            sys.path.remove(entry)
    sys.path.append(cwd)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"{flag} {spec!r}: cannot import {mod_name!r}: {one_line(e)}") from None
    except Exception as e:  # the module ran and raised
        raise UsageError(
            f"{flag} {spec!r}: importing {mod_name!r} raised {type(e).__name__}: {one_line(e)}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            top = mod_name.partition(".")[0]
            origin = getattr(module, "__file__", None) or "?"
            local = [p for p in (f"{top}.py", f"{top}/__init__.py") if os.path.isfile(p)]
            shadow = (
                f" (it was imported from {origin}: an installed module of that name comes before "
                f"the local {local[0]}; rename the local file)"
                if local and not os.path.abspath(origin).startswith(cwd + os.sep)
                else ""
            )
            raise UsageError(
                f"{flag} {spec!r}: module {mod_name!r} has no attribute {attr!r}{shadow}"
            )
        obj = getattr(obj, part)
    return obj


def call(obj: Any, spec: str, flag: str) -> Any:
    if not callable(obj):
        return obj
    try:
        return obj()
    except Exception as e:
        raise UsageError(f"{flag} {spec!r} raised {type(e).__name__}: {one_line(e)}") from None

