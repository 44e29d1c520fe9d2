"""Timing a job's models: the float and simulated models in PyTorch, the ONNX export (int8 and
float) and the ONNX Runtime float model; the pieces every int8 runtime of
:mod:`ptqkit.report.runtimes` shares: :func:`latency_ms`, :func:`pt2_agreement` (a runtime's
outputs against the simulation and FP32), :func:`recorded` (a runtime that fails is recorded
and warned about, never raised: the model is quantized and saved already)."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..data import split_batch
from ..errors import PTQWarning, one_line
from ..scorer import compare, db_ratio, select


class JobLog(Protocol):
    """Where :func:`run_job` reports its progress (the CLI's console is one)."""

    def step(self, what: str) -> contextlib.AbstractContextManager[Any]: ...

    def log(self, message: str) -> None: ...


class _Silent:
    def step(self, what: str) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def log(self, message: str) -> None:
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
    exported, of the ONNX Runtime float model; plus what the export wrote (``onnx["int8"]`` is
    what the ONNX Runtime and OpenVINO rows of :mod:`.runtimes` run). An export
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
    from ..export import OrtModule, export_onnx, kernel_report

    with recorded(onnx, "ONNX export"):
        with log.step("exporting to ONNX (QDQ int8 and float)"):
            int8 = export_onnx(qmodel, out / "model.int8.onnx", example)
            fp32 = export_onnx(qmodel, out / "model.fp32.onnx", example, format="fp32+encodings")
        onnx["int8"], onnx["fp32"] = str(int8), str(fp32)
        onnx["size_bytes"] = {"int8": int8.stat().st_size, "fp32": fp32.stat().st_size}
        rep = kernel_report(int8)
        onnx["int_kernels"], onnx["float_kernels"] = rep.int_kernels, rep.float_kernels
        if latency:
            with log.step(f"timing ONNX Runtime float (batch {_batch_of(example)})"):
                threads = torch.get_num_threads()  # the same as PyTorch's, for a fair comparison
                lat["FP32 ONNX Runtime"] = latency_ms(OrtModule(fp32, threads), example)
    return lat, onnx


class Skipped(Exception):
    """A runtime with nothing to run (the job made no ONNX export): :func:`recorded` keeps the
    reason (``record["skipped"]``) without a warning."""


@contextlib.contextmanager
def recorded(record: dict[str, Any], what: str) -> Iterator[None]:
    """Run the block; an exception is recorded (``record["error"]``, one line) and warned about
    (:class:`~ptqkit.errors.PTQWarning` ``"<what> failed: ..."``), not raised: the model is
    quantized and saved already, a runtime that cannot take it must not lose the job. A
    :class:`Skipped` is recorded as ``record["skipped"]``, not warned about."""
    try:
        yield
    except Skipped as e:
        record["skipped"] = str(e)
    except Exception as e:
        record["error"] = one_line(e)
        warnings.warn(f"{what} failed: {one_line(e)}", PTQWarning, stacklevel=3)


def _program(qmodel: nn.Module, example: tuple, path: Path | None) -> tuple[Any, bool]:
    """The program with a dynamic batch, or, for a model whose batch is not free (one loaded
    from a program exported with a static batch size), with ``example``'s."""
    from ..errors import ExportError
    from ..export.pt2 import export_pt2

    try:
        return export_pt2(qmodel, example, path), True
    except ExportError as e:
        if "dynamic_batch=False" not in str(e):
            raise
    return export_pt2(qmodel, example, path, dynamic_batch=False), False


@torch.no_grad()
def pt2_agreement(
    fn: Callable[..., Any], model: nn.Module, qmodel: nn.Module, data: Iterable[Any], batch: int
) -> dict[str, Any]:
    """``fn`` (a runtime's int8 model) against the simulation ``qmodel`` and the float ``model``
    on ``data``, scored by :mod:`ptqkit.scorer`: top-1 agreement (%) and output SQNR (dB)
    ``10·log10(Σ ref² / Σ (ref - fn)²)``. ``fn`` is called on chunks of exactly ``batch``
    samples (a short last chunk is padded with copies of its last sample, their outputs
    dropped), so that a function compiled for one batch size is not recompiled."""
    sums = {"simulation": [0.0, 0.0, 0.0, 0.0], "fp32": [0.0, 0.0, 0.0, 0.0]}
    for i, b in enumerate(data):
        args, kwargs = split_batch(b, i)
        if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
            return {"skipped": "keyword or non-tensor inputs"}
        got = select(_chunked(fn, args, batch), None, "int8 runtime", api=None)
        for name, ref_model in (("simulation", qmodel), ("fp32", model)):
            ref = select(ref_model(*args), None, name, api=None)
            pair = compare(ref, got, len(args[0]), args)
            s = sums[name]
            s[0] += pair.samples
            s[1] += pair.agree
            s[2] += pair.signal
            s[3] += pair.noise
    res: dict[str, Any] = {"samples": int(sums["fp32"][0])}
    for name, (n, agree, signal, noise) in sums.items():
        res[f"top1_vs_{name}"] = 100.0 * agree / n if n else float("nan")
        res[f"sqnr_db_vs_{name}"] = db_ratio(signal, noise)
    return res


def _chunked(fn: Callable[..., Any], args: tuple, batch: int) -> torch.Tensor:
    n = len(args[0])
    outs = []
    for i in range(0, n, batch):
        part = [a[i : i + batch] for a in args]
        short = batch - len(part[0])
        if short:
            part = [torch.cat([p, p[-1:].expand(short, *p.shape[1:])]) for p in part]
        out = select(fn(*part), None, "int8 runtime", api=None)
        outs.append(out[: batch - short])
    return torch.cat(outs)
