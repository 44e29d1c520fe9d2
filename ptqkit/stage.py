"""The one shape of a pipeline stage, and the context that carries values between stages.

A stage is a :class:`Stage`: a name, a predicate on the config (``enabled``), whether it runs
over the data again after the calibration pass (``again(config)``: a one-shot iterator cannot
serve it),
and ``run(ctx)``, which reads and updates the :class:`Context`. :func:`run_stages` times each
one into ``info.stages[name]`` the same way, so no stage times itself. Values flow between
stages through the context's typed fields (the copy being quantized, the reference batch of the
capture check, the calibrators), never through attributes looked up by name. A stage that needs
what the float data shows during calibration declares a ``tap`` (hooks held open during the
calibration pass) instead of running a float pass of its own.

Adding a stage: write its function in its module, add one ``Stage(...)`` line to
:data:`ptqkit.pipeline.STAGES`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import PTQConfig
from .errors import ModelError
from .info import PTQInfo


@dataclass
class Context:
    """What the stages of one :func:`ptqkit.quantize` run share."""

    model: nn.Module  # the user's model: read, never modified
    data: Iterable[Any]  # the calibration batches
    config: PTQConfig
    info: PTQInfo
    ref: Any = None  # capture.verify.Reference: the model's output on the first batch, or None
    calibrators: dict[str, Any] = field(default_factory=dict)  # by quantizer, after calibration
    taps: dict[str, Any] = field(default_factory=dict)  # by stage: what it took from calibration
    _qmodel: nn.Module | None = None

    @property
    def qmodel(self) -> nn.Module:
        """The copy being quantized (set by the capture stage)."""
        if self._qmodel is None:
            raise ModelError("a stage ran before the model was captured")
        return self._qmodel

    @qmodel.setter
    def qmodel(self, value: nn.Module) -> None:
        self._qmodel = value


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: ``run(ctx)`` when ``enabled(config)``."""

    name: str
    run: Callable[[Context], None]
    enabled: Callable[[PTQConfig], bool] = lambda config: True
    #: whether, with this config, it iterates the calibration data again after calibration
    again: Callable[[PTQConfig], bool] = lambda config: False
    #: what it needs from the calibration pass: ``tap(ctx)`` returns a context manager held open
    #: during that pass (hooks that record what the float data flow shows), or ``None``; what
    #: it yields is kept in ``ctx.taps[name]`` for the stage's ``run``
    tap: Callable[[Context], AbstractContextManager[Any] | None] | None = None


def run_stages(stages: Sequence[Stage], ctx: Context) -> None:
    """Run the enabled ``stages`` in order, each timed into ``ctx.info.stages[name]``."""
    for stage in stages:
        if not stage.enabled(ctx.config):
            continue
        t0 = time.perf_counter()
        stage.run(ctx)
        stages_s = ctx.info.stages
        stages_s[stage.name] = stages_s.get(stage.name, 0.0) + time.perf_counter() - t0


def tapping(stages: Sequence[Stage], ctx: Context) -> ExitStack:
    """Open the taps of the enabled ``stages`` (see :attr:`Stage.tap`) for the calibration
    pass: ``with tapping(STAGES, ctx): <calibrate>``."""
    stack = ExitStack()
    with stack:
        for stage in stages:
            if stage.tap is not None and stage.enabled(ctx.config):
                tap = stage.tap(ctx)
                if tap is not None:
                    ctx.taps[stage.name] = stack.enter_context(tap)
        return stack.pop_all()


def iterating_again(stages: Sequence[Stage], config: PTQConfig) -> list[str]:
    """The enabled stages that run over the data after the calibration pass."""
    return [s.name for s in stages if s.enabled(config) and s.again(config)]


__all__ = ["Context", "Stage", "iterating_again", "run_stages", "tapping"]
