"""One streaming calibration pass: every activation quantizer observes its tensor as the data
flows through the (float) model once; memory does not grow with the number of batches.

Dynamic quantizers (``spec.dynamic``: their range comes from each input at run time) take no
part: no calibrator, no outlier tracking, no range; a model whose quantizers are all dynamic
is not run at all here."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..config import PTQConfig
from ..data import batch_size, channels_last, iter_batches, model_device, run_model, to_device
from ..info import PTQInfo, sample_shortfall
from ..progress import progress
from ..quant.modules import act_quants, set_act_mode
from ..sync import active
from . import distributed, outliers, watch
from .calibrators import make_calibrator

#: the calibrator that collects statistics when the choice is made per layer (``"auto"``)
AUTO_OBSERVER = "mse"


def observe(
    model: nn.Module,
    data: Iterable[Any],
    config: PTQConfig,
    info: PTQInfo,
    desc: str = "calibrate",
    on_batch: Callable[[int], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    channels_last_inputs: bool = False,
) -> int:
    """Run ``data`` through ``model`` with every quantizer in observe mode; returns batches seen.
    ``on_start(i, samples)`` is called before batch ``i``, ``on_batch(i)`` after it.
    ``channels_last_inputs``: feed 4-D inputs in channels-last memory (the layout the capture
    check passed in, ``Context.channels_last``: :mod:`ptqkit.capture.verify`)."""
    device = model_device(model)
    layout = channels_last if channels_last_inputs else None
    batches = samples = 0
    with torch.no_grad():
        for i, (args, kwargs) in progress(
            iter_batches(data, config.num_batches), config.progress, desc
        ):
            args, kwargs = to_device(args, kwargs, device)
            if layout is not None:
                args, kwargs = layout(args, kwargs)
            if on_start is not None:
                on_start(i, batch_size(args, kwargs))
            run_model(model, i, args, kwargs)
            if on_batch is not None:
                on_batch(i)
            batches += 1
            samples += batch_size(args, kwargs)
    info.calibration_batches, info.calibration_samples = batches, samples
    return batches


def observe_all(
    model: nn.Module,
    data: Iterable[Any],
    config: PTQConfig,
    info: PTQInfo,
    name: str | None = None,
    channels_last_inputs: bool = False,
) -> tuple[dict[str, Any], outliers.BatchMaxTracker]:
    """The observing half of :func:`calibrate`: one calibrator per activation quantizer (of
    ``name``, default the config's; ``AUTO_OBSERVER`` for ``"auto"``) fed by one pass over
    ``data`` (``channels_last_inputs``: as :func:`observe`'s). Returns the calibrators
    by quantizer name and the outlier-batch tracker."""
    quants = {n: q for n, q in act_quants(model).items() if not q.spec.dynamic}
    spec = config.activations
    if not quants or spec is None or spec.dynamic:
        return {}, outliers.BatchMaxTracker({})
    if name is None:
        name = AUTO_OBSERVER if config.calibration == "auto" else config.calibration
    auto = name == AUTO_OBSERVER and config.calibration == "auto"
    options = {} if auto or name != config.calibration else dict(config.calibrator_options)
    axis = spec.axis if spec.per_channel else None
    for q in quants.values():
        q.calibrator = make_calibrator(name, axis=axis, **options)
    tracker = outliers.BatchMaxTracker({n: q.calibrator for n, q in quants.items()})
    shared = tracker.samples

    def watched(m: nn.Module, d: Iterable[Any], c: PTQConfig, i: PTQInfo) -> int:
        watch.wrap(quants, shared)  # outlier samples left out, named (ptqkit.calibrate.watch)
        try:
            seen = observe(
                m,
                d,
                c,
                i,
                on_batch=tracker,
                on_start=shared.start,
                channels_last_inputs=channels_last_inputs,
            )
        except BaseException:
            for q in quants.values():  # (the calibrators are dropped: no decision to finish)
                q.calibrator = getattr(q.calibrator, "inner", q.calibrator)
            raise
        watch.unwrap(quants)
        return seen

    set_act_mode(model, "observe")
    try:
        if active():  # each rank observes its shard, then all merge
            distributed.observe_and_merge(watched, model, data, config, info, tracker)
        else:
            watched(model, data, config, info)
    finally:
        set_act_mode(model, "off")
    calibrators = {}
    for qname, q in quants.items():
        calibrators[qname], q.calibrator = q.calibrator, None
    return calibrators, tracker


def set_ranges(
    model: nn.Module,
    calibrators: dict[str, Any],
    tracker: outliers.BatchMaxTracker | None,
    config: PTQConfig,
    info: PTQInfo,
) -> dict[str, Any]:
    """The solving half of :func:`calibrate`: each quantizer's range from its calibrator; a
    quantizer whose calibrator saw nothing stays in float (warned). Returns the calibrators
    that set a range."""
    quants = act_quants(model)
    spec = config.activations
    if not calibrators or spec is None or spec.dynamic:
        return {}
    solved, ranges = {}, {}
    for qname, cal in calibrators.items():
        q = quants[qname]
        if getattr(cal, "stats", cal).lo is None:
            info.disabled[qname] = "never executed on the calibration data"
            info.warn(f"{q.label}: no calibration data reached it; it stays in float")
            continue
        ranges[qname] = cal.compute_range(spec)
        q.set_range(*ranges[qname])
        solved[qname] = cal
    labels = {n: q.label or n for n, q in quants.items()}
    outliers.record(solved, labels, info, tracker, ranges)
    few = sample_shortfall(info.calibration_samples)
    if few:
        info.warn(few)
    return solved


def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    config: PTQConfig,
    info: PTQInfo,
    channels_last_inputs: bool = False,
) -> dict[str, Any]:
    """Calibrate every activation quantizer of ``model``; returns their calibrators by name
    (``channels_last_inputs``: 4-D inputs in channels-last memory, ``Context.channels_last``)."""
    calibrators, tracker = observe_all(
        model, data, config, info, channels_last_inputs=channels_last_inputs
    )
    return set_ranges(model, calibrators, tracker, config, info)
