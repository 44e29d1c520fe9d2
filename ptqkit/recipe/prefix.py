"""What the recipes :func:`ptqkit.tune` tries have in common, computed once.

Most candidates differ only in what happens *after* the calibration pass: which range solver
reads the activation statistics (``minmax``, ``percentile``, ``kl``, ``mse``,
``auto_percentile``, ``auto``), how the weights are rounded (nearest with min-max or MSE ranges,
AdaRound), which bias correction runs, the range margin and the fallback. The capture, CLE,
SmoothQuant and the calibration pass (the expensive part on a real model: a float forward over
every calibration batch) are the same for all of them. A :class:`Prefix` is those first stages
run once, with one histogram per activation quantizer (a
:class:`~ptqkit.calibrate.stats.HistogramStats`, which tracks min/max as well) and the float
layer means empirical bias correction needs (its tap); :func:`quantize_from` finishes a copy of
it with any recipe whose prefix fields (:func:`ptqkit.techniques.prefix_fields`: the fields the
techniques of the ``"prefix"`` and ``"calibrate"`` phases read) match. The statistics are the
ones the recipe's own calibrator would have collected (same observer, same bins, same axis), so
the model is the one :func:`ptqkit.quantize` returns for that recipe on the same data (tested
to equal outputs); a recipe that needs another observer (``ema``: the batch sequence; other
``bins``) is not served (:func:`can_serve`) and runs the whole pipeline.

This is the "statistics apart from range solvers" split of the design, used the way NNCF's and
AIMET's search tools reuse collected statistics across trials.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..calibrate.auto import read_from
from ..calibrate.calibrators import check_calibration, make_calibrator
from ..calibrate.session import AUTO_OBSERVER, observe_all, set_ranges
from ..calibrate.stats import HistogramStats
from ..config import PTQConfig
from ..errors import ConfigError
from ..info import PTQInfo
from ..pipeline import attach
from ..stage import Context
from ..technique import run_stages, tapping
from ..techniques import in_phase, pipeline, prefix_fields
from ..techniques.calibrate import CALIBRATE


def prefix_key(config: PTQConfig) -> tuple[Any, ...]:
    """What a prefix built for ``config`` can be reused for (hashable)."""
    return tuple(repr(getattr(config, f)) for f in prefix_fields())


def _tap_config(config: PTQConfig) -> PTQConfig:
    """``config`` with every tap set to serve all its variants (``Technique.share_tap``)."""
    for t in pipeline():
        if t.share_tap is not None:
            config = t.share_tap(config)
    return config


@dataclass
class Prefix:
    """A captured copy whose activation statistics are collected but not yet solved."""

    model: nn.Module
    data: Iterable[Any]
    config: PTQConfig
    ctx: Context
    stats: dict[str, HistogramStats] = field(default_factory=dict)
    tracker: Any = None
    seconds: float = 0.0
    #: the techniques whose taps were open during the prefix's calibration pass
    tapped: frozenset[str] = frozenset()


def build_prefix(model: nn.Module, data: Iterable[Any], config: PTQConfig) -> Prefix:
    """Run the ``"prefix"`` techniques for ``config`` on ``data``, then the calibration pass
    observing every activation with a histogram (``AUTO_OBSERVER``) and every tap open in the
    form that serves all its variants, whatever ``config`` asks."""
    t0 = time.perf_counter()
    ctx = Context(model=model, data=data, config=config, info=PTQInfo(config=config.to_dict()))
    run_stages(in_phase("prefix"), ctx)
    tap_cfg = _tap_config(config)
    tap_ctx = Context(model, data, tap_cfg, ctx.info, channels_last=ctx.channels_last)
    tap_ctx.qmodel = ctx.qmodel
    t = time.perf_counter()
    with tapping(pipeline(), tap_ctx):
        cals, tracker = observe_all(
            ctx.qmodel, ctx.data, config, ctx.info, AUTO_OBSERVER, ctx.channels_last
        )
    ctx.info.stages[CALIBRATE.name] = time.perf_counter() - t
    ctx.taps = tap_ctx.taps
    stats = {n: c.stats for n, c in cals.items()}
    tapped = frozenset(t.name for t in pipeline() if t.takes_tap(tap_cfg))
    return Prefix(model, data, config, ctx, stats, tracker, time.perf_counter() - t0, tapped)


def _calibrators(prefix: Prefix, config: PTQConfig) -> dict[str, Any] | None:
    """Calibrators of ``config``'s kind reading the prefix's statistics, or ``None`` when
    they would have observed differently."""
    spec = config.activations
    if spec is None or not prefix.stats:
        return {}
    auto = config.calibration == "auto"
    name = AUTO_OBSERVER if auto else config.calibration
    options = {} if auto else dict(config.calibrator_options)
    axis = spec.axis if spec.per_channel else None
    out = {}
    for qname, hist in prefix.stats.items():
        try:
            cal = make_calibrator(name, axis=axis, **options)
        except (ConfigError, TypeError):
            return None
        if not read_from(cal, hist, exact=True):
            return None
        out[qname] = cal
    return out


def servable(config: PTQConfig) -> bool:
    """Whether a prefix built for ``config`` could finish it: its calibrator solves from the
    histogram the prefix collects (not ``ema``, not other ``bins``)."""
    spec = config.activations
    if spec is None:
        return True
    axis = spec.axis if spec.per_channel else None
    auto = config.calibration == "auto"
    try:
        cal = make_calibrator(
            AUTO_OBSERVER if auto else config.calibration,
            axis=axis,
            **({} if auto else dict(config.calibrator_options)),
        )
    except (ConfigError, TypeError):
        return False
    hist = getattr(make_calibrator(AUTO_OBSERVER, axis=axis), "stats", None)
    return isinstance(hist, HistogramStats) and read_from(cal, hist, exact=True)


def can_serve(prefix: Prefix, config: PTQConfig) -> bool:
    """Whether :func:`quantize_from` can finish ``config`` from ``prefix``."""
    return (
        prefix_key(prefix.config) == prefix_key(config)
        and _taps_served(prefix, config)
        and _calibrators(prefix, config) is not None
    )


def _taps_served(prefix: Prefix, config: PTQConfig) -> bool:
    """Whether every technique that reads a tap with ``config`` had it open in the prefix."""
    return all(t.name in prefix.tapped for t in pipeline() if t.takes_tap(config))


def quantize_from(prefix: Prefix, config: PTQConfig) -> nn.Module:
    """The model :func:`ptqkit.quantize` gives for ``config`` on the prefix's data, from a copy
    of the prefix (the prefix itself is not changed). ``ptq_info.stages`` holds the prefix's
    stage times (paid once) and this recipe's own. :class:`ConfigError` if it cannot serve
    ``config`` (:func:`can_serve`)."""
    check_calibration(config.calibration)
    same = prefix_key(prefix.config) == prefix_key(config) and _taps_served(prefix, config)
    cals = _calibrators(prefix, config) if same else None
    if cals is None:
        raise ConfigError("this recipe needs its own calibration pass (see can_serve)")
    src = prefix.ctx
    qmodel = copy.deepcopy(src.qmodel)
    info = copy.deepcopy(src.info)
    info.config = config.to_dict()
    ctx = Context(
        model=prefix.model,
        data=prefix.data,
        config=config,
        info=info,
        ref=src.ref,
        channels_last=src.channels_last,
        taps=_taps_for(src.taps, config),
    )
    ctx.qmodel = qmodel
    t = time.perf_counter()
    ctx.calibrators = set_ranges(qmodel, cals, prefix.tracker, config, info)
    info.stages[CALIBRATE.name] = info.stages.get(CALIBRATE.name, 0.0) + time.perf_counter() - t
    run_stages(in_phase("solve"), ctx)
    attach(qmodel, info, config)
    return qmodel


def _taps_for(taps: dict[str, Any], config: PTQConfig) -> dict[str, Any]:
    """A copy of what the prefix's taps took, for the techniques that read it with ``config``."""
    return {
        t.name: copy.deepcopy(taps[t.name])
        for t in pipeline()
        if t.name in taps and t.takes_tap(config)
    }


__all__ = [
    "Prefix",
    "build_prefix",
    "can_serve",
    "prefix_key",
    "quantize_from",
    "servable",
]
