"""The commands that read a user's model and data: ``quantize`` and ``report`` (both
:func:`ptqkit.run_job` with the command's arguments, then printed) and ``compare``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import PTQConfig
from ..io.files import write_text
from ..job import JobOptions, JobResult, example_input, run_job
from ..report.runtimes import RUNTIMES
from ..report.table import runtime_lines
from .config_file import load_config
from .console import Console
from .inputs_data import Data, load_data
from .inputs_model import load_model
from .outdir import prepare_out
from .static_batch import DYNAMIC_HINT, fit_batches, static_batch_size
from .usage import EXIT_OK, AllRunsFailed, UsageError, one_line

#: the report's note for a program exported with a static batch size
STATIC_SQNR_NOTE = (
    "Per-layer SQNR not measured: it runs sub-batches, which a program exported with a "
    "static batch size refuses."
)


def _tune_budget(seconds: float | None) -> float | None:
    """``--tune SECONDS``: ``None`` or ``0`` is off; a negative budget is a usage error."""
    if seconds is None or seconds == 0:
        return None
    if not seconds > 0:
        raise UsageError(f"--tune takes a budget in seconds > 0 (0: off), got {seconds:g}")
    return float(seconds)


def _runtimes(names: str | None) -> tuple[str, ...] | None:
    """``--runtimes a,b``: the int8 runtimes to run (not given: all; ``""``: none); an unknown
    name is a usage error listing the known ones."""
    if names is None:
        return None
    keys = tuple(n.strip() for n in names.split(",") if n.strip())
    unknown = [k for k in keys if k not in RUNTIMES]
    if unknown:
        raise UsageError(f"--runtimes: unknown {','.join(unknown)}; known: {','.join(RUNTIMES)}")
    return keys


def run(
    console: Console,
    args: argparse.Namespace,
    model: Any,
    calib: Data,
    evald: Data | None,
    config: PTQConfig,
    out_dir: Path | None,
    report_path: Path | None,
    *,
    command: str,
    title: str,
    notes: list[str],
    qmodel: Any = None,
) -> JobResult:
    """:func:`ptqkit.run_job` with the command's arguments; prints the FP32 vs INT8 table, the
    runtimes that ran int8 (kernels, latency), the comparison of methods, the advice and the
    files written."""
    size = static_batch_size(model)
    options = JobOptions(
        out_dir=out_dir,
        report_path=report_path,
        metric=args.metric,
        compare=getattr(args, "compare", False),
        sensitivity=getattr(args, "sensitivity", False),
        export=not getattr(args, "no_onnx", False),
        latency=not getattr(args, "no_latency", False),
        pt2=not getattr(args, "no_pt2", False),
        runtimes=_runtimes(getattr(args, "runtimes", None)),
        example=None if size is None else example_input(calib.batches, size),
        layer_sqnr=size is None,
        tune_budget_s=_tune_budget(getattr(args, "tune", None)),
        title=title,
        notes=notes if size is None else [*notes, STATIC_SQNR_NOTE],
        descriptions=(calib.description, (evald or calib).description),
        command=command,
        max_plots=getattr(args, "max_plots", 24),
        report_batches=getattr(args, "report_batches", 2),
        extra_summary={"model": getattr(args, "model", None)},
    )
    job = run_job(
        model,
        calib.batches,
        None if evald is None else evald.batches,
        config.replace(progress=not console.quiet),
        options,
        qmodel=qmodel,
        log=console,
    )
    console.out(job.table())
    for name, text in runtime_lines(job.int8_runtimes()):
        console.out(f"int8 on {name}: {text}")
    if job.comparison is not None:
        console.out("\n" + job.comparison.table())
    print_advice(console, job.advice)
    for k, v in job.files.items():
        console.out(f"{k}: {v}")
    return job


def print_advice(console: Console, advice: list[Any]) -> None:
    if not advice:
        console.out("advice: none; every practice that could be checked holds")
        return
    console.out("advice:")
    for a in advice:
        console.out(f"  [{a.level}] {a.message}")


def load_inputs(args: argparse.Namespace, console: Console) -> tuple[Any, Data, Data | None]:
    """``--model``, ``--data`` and ``--eval-data``; for a program exported with a static batch
    size, the data in batches of exactly that size (see :mod:`.static_batch`)."""
    model = load_model(args.model)
    calib = load_data(args.data, args)
    evald = load_data(args.eval_data, args, "--eval-data") if args.eval_data else None
    size = static_batch_size(model)
    if size is not None and getattr(args, "sensitivity", False):
        raise UsageError(
            f"--sensitivity runs sub-batches, which --model {args.model} refuses (it was exported "
            f"with a static batch of {size}); drop --sensitivity, or {DYNAMIC_HINT}"
        )
    if size is not None:
        console.log(
            f"--model {args.model} was exported with a static batch of {size}: every batch "
            f"(calibration, evaluation, report, export) has {size} samples; to {DYNAMIC_HINT}"
        )
        calib = fit_batches(calib, size, "--data", UsageError, console.warn)
        if evald is not None:
            evald = fit_batches(evald, size, "--eval-data", UsageError, console.warn)
    return model, calib, evald


def cmd_quantize(args: argparse.Namespace, console: Console) -> int:
    config = load_config(args.config)
    out = prepare_out(args.out, args.force)
    model, calib, evald = load_inputs(args, console)
    notes = [f"Model {args.model}."]
    if evald is None:
        notes.append("No --eval-data: evaluated on the calibration data.")
    title = f"ptqkit: {args.model}"
    run(console, args, model, calib, evald, config, out, out / "report.html",
        command="quantize", title=title, notes=notes)
    return EXIT_OK


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    import ptqkit

    config = load_config(args.config)
    out = prepare_out(args.out, args.force, is_file=True)
    model, calib, evald = load_inputs(args, console)
    qmodel = None
    if args.quantized:
        if not Path(args.quantized).is_file():
            raise UsageError(f"--quantized {args.quantized}: no such file")
        with console.step(f"loading {args.quantized}"):
            qmodel = ptqkit.load(args.quantized, model)
    args.no_onnx = args.no_pt2 = True  # a report of the model: no export, no int8 runtimes
    args.runtimes = ""
    which = f", quantized model {args.quantized}." if args.quantized else "."
    notes = [f"Model {args.model}{which}"]
    title = f"ptqkit report: {args.model}"
    run(console, args, model, calib, evald, config, None, out,
        command="report", title=title, notes=notes, qmodel=qmodel)
    return EXIT_OK


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    import ptqkit

    from ..compare import compare, detect_metric
    from ..errors import ConfigError
    from ..report.html import write_report

    config = load_config(args.config).replace(progress=False)
    out = prepare_out(args.out, args.force) if args.out else None
    model, calib, evald = load_inputs(args, console)
    evald = evald or calib
    metric = args.metric if args.metric != "auto" else detect_metric(evald.batches)
    calibrators = args.calibrators.split(",") if args.calibrators else None
    try:
        with console.step(f"comparing methods ({metric} on {evald.description})"):
            result = compare(
                model,
                calib.batches,
                evald.batches,
                config,
                metric=metric,
                calibrators=calibrators,
                granularity=not args.per_channel_only,
                recovery=not args.no_recovery,
                keep_best=out is not None,
                on_row=lambda r: console.log(
                    f"  {r.method}: "
                    + (f"{r.quantized:.2f} in {r.quantize_s:.1f} s" if not r.error else r.error)
                ),
                progress_bar=not console.quiet,
            )
    except ConfigError as e:
        raise UsageError(one_line(e)) from None
    console.out(result.table())
    best = result.best()
    if best is not None:
        console.out(f"best: {best.method} ({metric} {best.quantized:.2f})")
    failed = None
    if best is None and result.rows:
        first = result.rows[0]
        failed = f"all {len(result.rows)} methods failed (first: {first.method}: {first.error})"
    if out is not None:
        text = json.dumps(result.to_dict(), indent=1, default=str, allow_nan=True) + "\n"
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "comparison.json", text)
        console.out(f"comparison: {out / 'comparison.json'}")
        if best is not None and result.best_model is not None:
            res = ptqkit.evaluate(
                model, result.best_model, evald.batches, metric, progress_bar=False
            )
            static = static_batch_size(model) is not None
            with console.step("writing the report of the best method"):
                write_report(
                    result.best_model,
                    out / "report.html",
                    model=model,
                    data=calib.batches,
                    result=res,
                    comparison=result,
                    title=f"ptqkit compare: {args.model}",
                    sensitivity={} if static else None,
                    notes=[f"Best method: {best.method}.", *([STATIC_SQNR_NOTE] if static else [])],
                )
            console.out(f"report: {out / 'report.html'}")
    if failed is not None:
        raise AllRunsFailed(failed)
    return EXIT_OK
