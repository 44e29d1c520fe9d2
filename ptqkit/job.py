"""The whole job as one call: quantize → evaluate → (compare, sensitivity) → save → export →
time → report, with its summary. ``ptqkit quantize``/``demo``/``report`` are this function plus
argument parsing and printing; a Python user gets the same files and the same summary::

    job = ptqkit.run_job(model, calib_data, eval_data, cfg, out_dir="out/")
    print(job.table())                      # FP32 vs INT8: metric, agreement, KL, size, latency
    job.summary["files"]                    # model.ptq.safetensors, model.int8.onnx, report.html …

Nothing here prints: progress goes through the optional ``log`` (a :class:`JobLog`), warnings
through :mod:`warnings` (:class:`~ptqkit.errors.PTQWarning`), results into :class:`JobResult`.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .config import PTQConfig
from .data import split_batch
from .errors import PTQWarning, SaveError, one_line
from .info import info_of


class JobLog(Protocol):
    """Where :func:`run_job` reports its progress (the CLI's console is one)."""

    def step(self, what: str) -> contextlib.AbstractContextManager[Any]: ...

    def log(self, message: str) -> None: ...


class _Silent:
    def step(self, what: str) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def log(self, message: str) -> None:
        return None


@dataclass
class JobResult:
    """What :func:`run_job` produced. ``summary`` is what ``summary.json`` holds."""

    qmodel: nn.Module
    result: Any  # EvalResult
    latency_ms: dict[str, float] = field(default_factory=dict)
    onnx: dict[str, Any] = field(default_factory=dict)
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
        return result_table(self.result, self.latency_ms, self.latency_batch)


def example_input(batches: Iterable[Any], n: int = 1) -> tuple | None:
    """The first ``n`` samples of the first batch as positional inputs (``None`` for keyword
    inputs)."""
    for batch in batches:
        args, kwargs = split_batch(batch)
        if kwargs or not all(isinstance(a, torch.Tensor) for a in args):
            return None
        return tuple(a[:n] for a in args)
    return None


def _batch_of(example: tuple | None) -> int:
    return len(example[0]) if example else 1


def latency_ms(fn: Callable[..., Any], example: tuple, repeat: int = 10) -> float:
    """Best wall time of ``repeat`` calls of ``fn(*example)`` in milliseconds, after two warm-up
    calls (the best, not the median: on a shared machine the other runs measure the others)."""
    times = []
    with torch.no_grad():
        for i in range(repeat + 2):
            t0 = time.perf_counter()
            fn(*example)
            if i >= 2:
                times.append(1000 * (time.perf_counter() - t0))
    return min(times)


def export_and_time(
    log: JobLog,
    model: nn.Module,
    qmodel: nn.Module,
    example: tuple | None,
    out: Path | None,
    export: bool = True,
    latency: bool = True,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Latencies (ms, on ``example``'s batch) of the float and simulated models and, when
    exported, of the ONNX Runtime float and int8 models; plus what the export wrote. An export
    failure is recorded (``onnx["error"]``) and warned about, not raised: the model is quantized
    and saved already."""
    lat: dict[str, float] = {}
    onnx: dict[str, Any] = {}
    if example is None:
        onnx["skipped"] = "the model takes keyword inputs; ONNX export needs positional tensors"
        return lat, onnx
    if latency:
        with log.step(f"timing FP32 and simulated INT8 (PyTorch, batch {_batch_of(example)})"):
            lat["FP32 PyTorch"] = latency_ms(model, example)
            lat["INT8 simulated PyTorch"] = latency_ms(qmodel, example)
    if not export or out is None:
        return lat, onnx
    from .export import OrtModule, export_onnx, kernel_report

    try:
        with log.step("exporting to ONNX (QDQ int8 and float)"):
            int8 = export_onnx(qmodel, out / "model.int8.onnx", example)
            fp32 = export_onnx(qmodel, out / "model.fp32.onnx", example, format="fp32+encodings")
        onnx["int8"], onnx["fp32"] = str(int8), str(fp32)
        onnx["size_bytes"] = {"int8": int8.stat().st_size, "fp32": fp32.stat().st_size}
        rep = kernel_report(int8)
        onnx["int_kernels"], onnx["float_kernels"] = rep.int_kernels, rep.float_kernels
        if latency:
            with log.step(f"timing ONNX Runtime float and int8 (batch {_batch_of(example)})"):
                threads = torch.get_num_threads()  # the same as PyTorch's, for a fair comparison
                lat["FP32 ONNX Runtime"] = latency_ms(OrtModule(fp32, threads), example)
                lat["INT8 ONNX Runtime"] = latency_ms(OrtModule(int8, threads), example)
    except Exception as e:  # the model is still quantized and saved: report, do not fail
        onnx["error"] = one_line(e)
        warnings.warn(f"ONNX export failed: {one_line(e)}", PTQWarning, stacklevel=2)
    return lat, onnx


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _speed(fp32_ms: float, int8_ms: float) -> str:
    """``int8 kernels, 1.27x faster`` or, when the int8 model is the slower one, ``... slower``
    (it can be: on x86 CPUs without VNNI int8 convolutions gain little, and small or depthwise
    layers pay for their QuantizeLinear / DequantizeLinear nodes)."""
    if not (fp32_ms > 0 and int8_ms > 0):
        return ""
    if int8_ms <= fp32_ms:
        return f"int8 kernels, {fp32_ms / int8_ms:.2f}x faster"
    return f"int8 kernels, {int8_ms / fp32_ms:.2f}x slower than FP32 on this machine"


def result_table(res: Any, lat: dict[str, float], batch: int = 1) -> str:
    """The short FP32 vs INT8 table of an :class:`~ptqkit.EvalResult` and latencies (measured on
    batches of ``batch`` samples)."""
    unit = "%" if res.metric in ("top1", "top5", "agreement") else ""
    rows = [
        ("", "FP32", "INT8", ""),
        (
            res.metric,
            f"{res.fp32:.2f}{unit}",
            f"{res.quantized:.2f}{unit}",
            f"degradation {res.degradation:+.2f} points",
        ),
        ("top-1 agreement", "", f"{res.agreement:.2f}%", f"KL {res.kl:.3g} nats"),
        (
            "size",
            _size(res.size_bytes_fp32),
            _size(res.size_bytes_quantized),
            f"{res.compression:.2f}x smaller" if res.compression else "",
        ),
    ]
    for label, f_key, q_key, note in (
        ("latency PyTorch", "FP32 PyTorch", "INT8 simulated PyTorch", None),
        ("latency ONNX Runtime", "FP32 ONNX Runtime", "INT8 ONNX Runtime", "kernels"),
    ):
        if q_key in lat:
            f, q = lat[f_key], lat[q_key]
            text = "int8 simulated in float (fake-quant)"
            if note:
                text = _speed(f, q)
            rows.append((label, f"{f:.2f} ms", f"{q:.2f} ms", text))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    lines.append(f"({res.samples} evaluation samples; latency: best of 10 runs, batch {batch})")
    return "\n".join(lines)


def _summary(command: str, qmodel: Any, res: Any, extra: dict[str, Any]) -> dict[str, Any]:
    from . import __version__

    info = qmodel.ptq_info
    return {
        "ptqkit": __version__,
        "command": command,
        "config": qmodel.ptq_config.to_dict(),
        "evaluation": res.to_dict() if res is not None else None,
        "quantization": {
            "traced": info.traced,
            "layers": len(info.layers),
            "skipped": info.skipped,
            "activation_quantizers": len(info.quantizers),
            "float_quantizers": info.disabled,
            "calibration_samples": info.calibration_samples,
            "stages_s": info.stages,
            "warnings": info.warnings,
        },
        # ptqkit.tune: the choice in one line and every recipe tried (empty when not tuned)
        "recipe": {"summary": info.recipe, **info.details.get("recipe", {})},
        **extra,
    }


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


def run_job(
    model: nn.Module,
    calib_data: Iterable[Any],
    eval_data: Iterable[Any] | None = None,
    config: PTQConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    report_path: str | Path | None = None,
    metric: str = "auto",
    compare: bool = False,
    sensitivity: bool = False,
    export: bool = True,
    latency: bool = True,
    example: tuple | None = None,
    layer_sqnr: bool = True,
    qmodel: nn.Module | None = None,
    tune_budget_s: float | None = None,
    title: str = "ptqkit report",
    notes: Sequence[str] = (),
    descriptions: tuple[str, str] = ("calibration data", "evaluation data"),
    command: str = "run_job",
    max_plots: int = 24,
    report_batches: int = 2,
    log: JobLog | None = None,
    extra_summary: dict[str, Any] | None = None,
) -> JobResult:
    """Quantize ``model`` on ``calib_data`` (unless ``qmodel`` is given), evaluate it against
    ``model`` on ``eval_data`` (on the calibration data when ``None``, and the report says so),
    optionally compare every method and measure per-layer sensitivity, then, with ``out_dir``,
    save ``model.ptq.safetensors``, export ``model.int8.onnx`` and ``model.fp32.onnx``, time
    them in ONNX Runtime, and write ``summary.json``; with ``report_path`` (default
    ``out_dir/report.html``) the HTML report. Returns a :class:`JobResult`.

    ``example`` is the positional input of the export and the latencies (default: the first
    sample of the first calibration batch; a program exported with a static batch size needs a
    whole batch). ``layer_sqnr=False`` leaves the per-layer SQNR out of the report (it runs
    sub-batches, which such a program refuses); with ``sensitivity`` it is measured anyway.
    With ``tune_budget_s``, the recipe is searched by :func:`ptqkit.tune` within that many
    seconds (``config`` is the base recipe) instead of taken as given."""
    import ptqkit

    from .compare import compare as compare_methods
    from .compare import detect_metric
    from .report.html import write_report
    from .report.measure import collect

    log = log or _Silent()
    config = PTQConfig() if config is None else config
    out = Path(out_dir) if out_dir is not None else None
    if report_path is None and out is not None:
        report_path = out / "report.html"
    calib_desc, eval_desc = descriptions
    if qmodel is None and tune_budget_s:
        with log.step(f"searching the best recipe (ptqkit.tune, {tune_budget_s:g} s budget)"):
            qmodel = ptqkit.tune(model, calib_data, config, budget_s=tune_budget_s)
        log.log(info_of(qmodel).recipe)
    elif qmodel is None:
        with log.step(f"quantizing ({calib_desc})"):
            qmodel = ptqkit.quantize(model, calib_data, config)
    on_calib = eval_data is None
    evald = calib_data if eval_data is None else eval_data
    eval_desc = calib_desc if on_calib else eval_desc
    metric = metric if metric != "auto" else detect_metric(evald)
    # evaluate's own advice warnings are part of the advice of the report
    with log.step(f"evaluating ({metric} on {eval_desc})"), _quiet_ptq_warnings():
        res = ptqkit.evaluate(model, qmodel, evald, metric, progress_bar=config.progress)
    job = JobResult(qmodel=qmodel, result=res)
    if compare:
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
    if sensitivity:
        with log.step("per-layer sensitivity"):
            job.sensitivity = ptqkit.sensitivity(qmodel, evald, config)
    if out is not None:
        _mkdir(out)
        with log.step("saving the quantized model"):
            ptqkit.save(qmodel, out / "model.ptq.safetensors")
        job.files["quantized_model"] = str(out / "model.ptq.safetensors")
    example = example_input(calib_data) if example is None else example
    job.latency_batch = _batch_of(example)
    job.latency_ms, job.onnx = export_and_time(
        log, model, qmodel, example, out, export=export, latency=latency
    )
    with log.step("writing the report" if report_path is not None else "collecting advice"):
        rep = collect(
            qmodel,
            model=model,
            data=calib_data,
            eval_data=None if on_calib else evald,
            result=res,
            sensitivity=job.sensitivity if job.sensitivity is not None or layer_sqnr else {},
            comparison=job.comparison,
            latency=job.latency_ms,
            title=title,
            notes=notes,
            evaluated_on_calibration_data=on_calib,
            extra=[("calibration data", calib_desc), ("evaluation data", eval_desc)],
            max_histograms=max_plots,
            max_weights=max_plots,
            batches=report_batches,
        )
        if job.onnx.get("int8"):
            rep.summary.append(
                (
                    "ONNX Runtime kernels",
                    f"{job.onnx['int_kernels']} integer, "
                    f"{job.onnx['float_kernels']} float conv/matmul/gemm",
                )
            )
        if report_path is not None:
            write_report(None, report_path, report=rep)
            job.files["report"] = str(report_path)
    job.report, job.advice = rep, list(rep.advice)
    job.files.update({f"onnx_{k}": v for k, v in job.onnx.items() if k in ("int8", "fp32")})
    job.summary = _summary(
        command,
        qmodel,
        res,
        {
            **(extra_summary or {}),
            "calibration_data": calib_desc,
            "evaluation_data": eval_desc,
            "evaluated_on_calibration_data": on_calib,
            "latency_ms": job.latency_ms,
            "onnx": job.onnx,
            "files": job.files,
            "advice": [a.to_dict() for a in rep.advice],
            "comparison": job.comparison.to_dict() if job.comparison is not None else None,
        },
    )
    if out is not None:
        path = out / "summary.json"
        text = json.dumps(job.summary, indent=1, default=str, allow_nan=True) + "\n"
        path.write_text(text, encoding="utf-8")
        job.files["summary"] = str(path)
    return job


__all__ = ["JobLog", "JobResult", "example_input", "latency_ms", "result_table", "run_job"]
