"""The registry of ONNX graph passes: a pass is a function ``Graph → number of rewrites``
registered under a name; :func:`run_passes` applies them in registration order."""

from __future__ import annotations

from collections.abc import Callable

import onnx

from ...errors import ExportError
from ..graph import Graph

PassFn = Callable[[Graph], int]
#: name → pass; each pass returns how many rewrites it made
PASSES: dict[str, PassFn] = {}


def register_pass(name: str) -> Callable[[PassFn], PassFn]:
    """Register a graph pass under ``name`` (run after the ones registered before it)."""

    def deco(fn: PassFn) -> PassFn:
        PASSES[name] = fn
        return fn

    return deco


def run_passes(model: onnx.ModelProto, names: list[str] | None = None) -> dict[str, int]:
    """Apply the passes ``names`` (default: all, in registry order) to ``model`` in place;
    returns the number of rewrites per pass."""
    g = Graph(model)
    counts = {}
    for name in names if names is not None else list(PASSES):
        try:
            counts[name] = PASSES[name](g)
        except Exception as e:  # a bug in a pass: say which one, not a deep traceback
            raise ExportError(f"ONNX graph pass {name!r} failed: {type(e).__name__}: {e}") from e
        g.reindex()
    g.finish()
    return counts


__all__ = ["PASSES", "PassFn", "register_pass", "run_passes"]
