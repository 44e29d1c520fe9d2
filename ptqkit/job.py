"""The whole job as one call: quantize → evaluate → (compare, sensitivity) → save → export →
time (PyTorch; int8 on ONNX Runtime, Inductor, OpenVINO, ExecuTorch) → report, with its summary.
``ptqkit quantize``/``demo``/``report`` are this function plus argument parsing and printing;
a Python user gets the same files and the same summary::

    job = ptqkit.run_job(model, calib_data, eval_data, cfg, out_dir="out/")
    print(job.table())                      # FP32 vs INT8: metric, agreement, KL, size, latency
    job.summary["files"]                    # model.ptq.safetensors, model.int8.onnx, report.html …
    job.summary["int8_runtimes"]            # which runtimes ran int8, how many layers, how fast

Nothing here prints: progress goes through the optional ``log`` (a :class:`JobLog`), warnings
through :mod:`warnings` (:class:`~ptqkit.errors.PTQWarning`), results into :class:`JobResult`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .analysis.metrics import evaluate
from .analysis.sensitivity import sensitivity
from .compare import compare as compare_methods
from .compare import detect_metric
from .config import PTQConfig
from .data import split_batch
from .errors import ConfigError, PTQWarning, SaveError
from .info import info_of
from .io import save
from .io.files import write_text
from .pipeline import quantize
from .recipe import tune
from .report.html import write_report
from .report.measure import collect
from .report.runtimes import RUNTIMES, Context, select, time_runtimes
from .report.summary import job_summary
from .report.table import int8_runtimes, result_table, runtime_lines
from .report.timing import JobLog, _batch_of, _Silent, export_and_time, latency_ms

#: ``files`` keys of what the int8 runtimes write: (runtime, its record's key) → files key
FILE_KEYS = {("inductor", "program"): "pt2_int8", ("executorch", "program"): "pte_int8",
             ("openvino", "onnx"): "onnx_openvino"}  # fmt: skip


@dataclass
class JobResult:
    """What :func:`run_job` produced. ``summary`` is what ``summary.json`` holds."""

    qmodel: nn.Module
    result: Any  # EvalResult
    latency_ms: dict[str, float] = field(default_factory=dict)
    onnx: dict[str, Any] = field(default_factory=dict)
    #: the PyTorch int8 (Inductor) record, ``runtimes["inductor"]``
    pt2: dict[str, Any] = field(default_factory=dict)
    #: each int8 runtime's record by key (:func:`~ptqkit.report.runtimes.time_runtime`):
    #: layer counts, agreement with the simulation and FP32, latency by batch; ``status``
    #: (not installed), ``skipped`` or ``error`` where it did not run
    runtimes: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    advice: list[Any] = field(default_factory=list)
    comparison: Any = None
    sensitivity: Any = None
    report: Any = None
    summary: dict[str, Any] = field(default_factory=dict)
    #: samples in the batch the latencies were measured on
    latency_batch: int = 1

    def table(self) -> str:
        """The short FP32 vs INT8 table (metric, agreement and KL, size, latencies)."""
        return result_table(self.result, self.latency_ms, self.latency_batch, self.runtimes)

    def int8_runtimes(self) -> list[dict[str, Any]]:
        """Every runtime that ran the model on integer kernels: layers on integer and float
        kernels, latency (ms) by batch, agreement; and those not installed
        (``summary["int8_runtimes"]``)."""
        return int8_runtimes(self.runtimes)


def example_input(batches: Iterable[Any], n: int = 1) -> tuple | None:
    """The first ``n`` samples of the first batch as positional inputs (``None`` for keyword
    inputs)."""
    for batch in batches:
        args, kwargs = split_batch(batch)
        if kwargs or not all(isinstance(a, torch.Tensor) for a in args):
            return None
        return tuple(a[:n] for a in args)
    return None


def _mkdir(p: Path) -> Path:
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SaveError(f"{p}: cannot create the folder: {e.strerror or e}") from None
    return p


@contextlib.contextmanager
def _quiet_ptq_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTQWarning)
        yield


@dataclass(frozen=True)
class JobOptions:
    """What :func:`run_job` produces besides the quantized model and its evaluation.

    Fields:
        out_dir: where ``model.ptq.safetensors``, the ONNX models, ``summary.json`` and the
            report go (``None``: nothing is written).
        report_path: the HTML report (default ``out_dir/report.html``).
        metric: ``"auto"`` (top-1 with labels, agreement without), or a metric of
            :func:`ptqkit.evaluate`.
        compare: also quantize with every method and compare them (:func:`ptqkit.compare`).
        sensitivity: also measure per-layer sensitivity (:func:`ptqkit.sensitivity`).
        export: export and time the ONNX models (needs ``out_dir``; ONNX Runtime's and
            OpenVINO's int8 rows run the int8 file).
        latency: time the models, and run the int8 runtimes.
        runtimes: with ``latency``, the int8 runtimes to run (``None``: all; keys of
            :data:`~ptqkit.report.runtimes.RUNTIMES`: ``onnxruntime``, ``inductor``,
            ``openvino``, ``executorch``): layers on integer kernels, outputs against the
            simulation and FP32 on the evaluation data, latency at batch 1 and the latency
            batch; a missing package is listed ``not installed (pip install ...)``, a failure
            recorded (``runtimes[key]["error"]``) and warned about.
        pt2: ``False`` leaves out Inductor (:func:`ptqkit.export_pt2` → ``model.int8.pt2`` →
            :func:`ptqkit.compile_int8`: 10 s for a small CNN, tens of s for an EfficientNet).
        example: positional input of the export and the latencies (default: the first sample of
            the first calibration batch; a program exported with a static batch size needs a
            whole batch).
        layer_sqnr: put the per-layer SQNR in the report (it runs sub-batches, which a program
            with a static batch size refuses); with ``sensitivity`` it is measured anyway.
        tune_budget_s: search the recipe with :func:`ptqkit.tune` within that many seconds
            (the config is the base recipe) instead of taking it as given.
        title, notes: the report's title and its notes.
        descriptions: how the calibration and the evaluation data are described.
        command: what the summary says produced it.
        max_plots: most histograms and weight plots in the report.
        report_batches: batches the report's histograms and SQNR are measured on.
        extra_summary: more entries for ``summary.json``.
    """

    out_dir: str | Path | None = None
    report_path: str | Path | None = None
    metric: str = "auto"
    compare: bool = False
    sensitivity: bool = False
    export: bool = True
    latency: bool = True
    pt2: bool = True
    runtimes: tuple[str, ...] | None = None
    example: tuple | None = None
    layer_sqnr: bool = True
    tune_budget_s: float | None = None
    title: str = "ptqkit report"
    notes: Sequence[str] = ()
    descriptions: tuple[str, str] = ("calibration data", "evaluation data")
    command: str = "run_job"
    max_plots: int = 24
    report_batches: int = 2
    extra_summary: dict[str, Any] | None = None

    @property
    def out(self) -> Path | None:
        return Path(self.out_dir) if self.out_dir is not None else None

    @property
    def report(self) -> Path | None:
        if self.report_path is not None:
            return Path(self.report_path)
        return self.out / "report.html" if self.out is not None else None


def _options(options: JobOptions | None, fields: dict[str, Any]) -> JobOptions:
    """``options`` with ``fields`` changed; an unknown field is a :class:`ConfigError` that
    lists the valid ones."""
    if options is not None and not isinstance(options, JobOptions):
        raise ConfigError(f"options must be a JobOptions, got {type(options).__name__}")
    names = {f.name for f in dataclasses.fields(JobOptions)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ConfigError(f"unknown run_job option(s) {unknown}; valid: {sorted(names)}")
    opts = dataclasses.replace(options or JobOptions(), **fields)
    select(opts.runtimes)  # an unknown runtime: refused before anything runs
    return opts


def run_job(
    model: nn.Module,
    calib_data: Iterable[Any],
    eval_data: Iterable[Any] | None = None,
    config: PTQConfig | None = None,
    options: JobOptions | None = None,
    *,
    qmodel: nn.Module | None = None,
    log: JobLog | None = None,
    **fields: Any,
) -> JobResult:
    """Quantize ``model`` on ``calib_data`` (unless ``qmodel`` is given), evaluate it against
    ``model`` on ``eval_data`` (on the calibration data when ``None``, and the report says so),
    then do what ``options`` (a :class:`JobOptions`) asks: compare every method, measure
    per-layer sensitivity and, with ``out_dir``, save ``model.ptq.safetensors``, export
    ``model.int8.onnx`` and ``model.fp32.onnx``, run the int8 model on each runtime of
    ``runtimes`` (ONNX Runtime, PyTorch Inductor with ``model.int8.pt2``, OpenVINO, ExecuTorch
    XNNPACK with ``model.int8.pte``): layers on integer kernels, agreement, latency; write
    ``summary.json`` and the HTML report. Returns a :class:`JobResult`.

    ``fields`` are :class:`JobOptions` fields given by name, a shorthand for
    ``options=JobOptions(...)`` (``run_job(model, calib, test, cfg, out_dir="out/")``); they
    override ``options``. ``log`` receives the progress (the CLI's console is one)."""
    opts = _options(options, fields)
    log = log or _Silent()
    config = PTQConfig() if config is None else config
    if qmodel is None:
        qmodel = _quantized(model, calib_data, config, opts, log)
    on_calib = eval_data is None
    evald = calib_data if eval_data is None else eval_data
    eval_desc = opts.descriptions[0] if on_calib else opts.descriptions[1]
    metric = opts.metric if opts.metric != "auto" else detect_metric(evald)
    # evaluate's own advice warnings are part of the advice of the report
    with log.step(f"evaluating ({metric} on {eval_desc})"), _quiet_ptq_warnings():
        res = evaluate(model, qmodel, evald, metric, progress_bar=config.progress)
    job = JobResult(qmodel=qmodel, result=res)
    _analyses(job, model, calib_data, evald, config, metric, opts, log)
    out = opts.out
    if out is not None:
        _mkdir(out)
        with log.step("saving the quantized model"):
            save(qmodel, out / "model.ptq.safetensors")
        job.files["quantized_model"] = str(out / "model.ptq.safetensors")
    example = example_input(calib_data) if opts.example is None else opts.example
    job.latency_batch = _batch_of(example)
    job.latency_ms, job.onnx = export_and_time(
        log, model, qmodel, example, out, export=opts.export, latency=opts.latency
    )
    if opts.latency:
        ctx = Context(model, qmodel, example, evald, out, job.onnx, log) if example else None
        lat, job.runtimes = time_runtimes(opts.runtimes, opts.pt2, ctx)
        job.latency_ms.update(lat)
        job.pt2 = job.runtimes.get("inductor", {})
    _report(job, model, calib_data, None if on_calib else evald, eval_desc, opts, log)
    _write_summary(job, on_calib, eval_desc, opts)
    return job


def _quantized(
    model: nn.Module, calib_data: Iterable[Any], config: PTQConfig, opts: JobOptions, log: JobLog
) -> nn.Module:
    """The model quantized with ``config``, or with the recipe ``tune`` finds in its budget."""
    if opts.tune_budget_s:
        budget = opts.tune_budget_s
        with log.step(f"searching the best recipe (ptqkit.tune, {budget:g} s budget)"):
            qmodel = tune(model, calib_data, config, budget_s=budget)
        log.log(info_of(qmodel).recipe)
        return qmodel
    with log.step(f"quantizing ({opts.descriptions[0]})"):
        return quantize(model, calib_data, config)


def _analyses(
    job: JobResult,
    model: nn.Module,
    calib_data: Iterable[Any],
    evald: Iterable[Any],
    config: PTQConfig,
    metric: str,
    opts: JobOptions,
    log: JobLog,
) -> None:
    """The optional comparison of every method and per-layer sensitivity."""
    if opts.compare:
        with log.step("comparing methods"):
            job.comparison = compare_methods(
                model,
                calib_data,
                evald,
                config,
                metric=metric,
                on_row=lambda r: log.log(
                    f"  {r.method}: "
                    + (f"{r.quantized:.2f} ({r.quantize_s:.1f} s)" if not r.error else r.error)
                ),
                progress_bar=config.progress,
            )
    if opts.sensitivity:
        with log.step("per-layer sensitivity"):
            job.sensitivity = sensitivity(job.qmodel, evald, config)


def _report(
    job: JobResult,
    model: nn.Module,
    calib_data: Iterable[Any],
    eval_data: Iterable[Any] | None,
    eval_desc: str,
    opts: JobOptions,
    log: JobLog,
) -> None:
    """Collect the report (and its advice); write it where ``opts`` says."""
    path = opts.report
    with log.step("writing the report" if path is not None else "collecting advice"):
        rep = collect(
            job.qmodel,
            model=model,
            data=calib_data,
            eval_data=eval_data,
            result=job.result,
            sensitivity=job.sensitivity if job.sensitivity is not None or opts.layer_sqnr else {},
            comparison=job.comparison,
            latency=job.latency_ms,
            title=opts.title,
            notes=opts.notes,
            evaluated_on_calibration_data=eval_data is None,
            extra=[("calibration data", opts.descriptions[0]), ("evaluation data", eval_desc)],
            max_histograms=opts.max_plots,
            max_weights=opts.max_plots,
            batches=opts.report_batches,
        )
        rep.summary += [
            (f"int8 on {name}", text) for name, text in runtime_lines(job.int8_runtimes())
        ]
        failed = [("ONNX export", job.onnx)]
        failed += [(RUNTIMES[k].name, rec) for k, rec in job.runtimes.items()]
        rep.summary += [(f"{name} failed", rec["error"]) for name, rec in failed if "error" in rec]
        if path is not None:
            write_report(None, path, report=rep)
            job.files["report"] = str(path)
    job.report, job.advice = rep, list(rep.advice)
    job.files.update({f"onnx_{k}": v for k, v in job.onnx.items() if k in ("int8", "fp32")})
    for (key, what), name in FILE_KEYS.items():
        if what in job.runtimes.get(key, {}):
            job.files[name] = job.runtimes[key][what]


def _write_summary(job: JobResult, on_calib: bool, eval_desc: str, opts: JobOptions) -> None:
    """``job.summary``, and ``summary.json`` in ``out_dir``."""
    from . import __version__

    job.summary = job_summary(
        __version__,
        opts.command,
        job.qmodel,
        job.result,
        {
            **(opts.extra_summary or {}),
            "calibration_data": opts.descriptions[0],
            "evaluation_data": eval_desc,
            "evaluated_on_calibration_data": on_calib,
            "latency_ms": job.latency_ms,
            "onnx": job.onnx,
            "pt2": job.pt2,
            "runtimes": job.runtimes,
            "int8_runtimes": job.int8_runtimes(),
            "files": job.files,
            "advice": [a.to_dict() for a in job.advice],
            "comparison": job.comparison.to_dict() if job.comparison is not None else None,
        },
    )
    out = opts.out
    if out is not None:
        path = out / "summary.json"
        text = json.dumps(job.summary, indent=1, default=str, allow_nan=True) + "\n"
        write_text(path, text)
        job.files["summary"] = str(path)


__all__ = [
    "JobLog",
    "JobOptions",
    "JobResult",
    "example_input",
    "latency_ms",
    "result_table",
    "run_job",
]
