"""Evaluation: the float model against its quantized copy (:mod:`.metrics`), and analyses.

This subpackage shares its name with the public function :func:`ptqkit.evaluate`. Importing any
of its modules binds ``ptqkit.evaluate`` to the subpackage, which would shadow the function, so
the subpackage itself is callable: ``ptqkit.evaluate(fp32, qmodel, data)`` is
:func:`ptqkit.evaluate.metrics.evaluate` whichever of the two the name is bound to.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .metrics import evaluate

        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
