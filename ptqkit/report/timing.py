"""Timing a job's models: the float and simulated models in PyTorch, exported, the ONNX
Runtime float and int8 models (with how many conv/matmul/gemm ops ran on integer kernels), and
the PyTorch int8 model: the ``torch.export`` program with pt2e Q/DQ ops compiled by Inductor
(with how many conv/linear ran on oneDNN int8 kernels, and how its outputs agree with the
simulation and with FP32). A runtime that fails is recorded and warned about, never raised:
the model is quantized and saved already."""

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

#: the PyTorch int8 row: its name in the table, the report and ``summary.json``, its latency key
PT2_ROW = "PyTorch int8 (Inductor)"
PT2_LATENCY = "INT8 PyTorch Inductor"


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
            with log.step(f"timing ONNX Runtime float and int8 (batch {_batch_of(example)})"):
                threads = torch.get_num_threads()  # the same as PyTorch's, for a fair comparison
                lat["FP32 ONNX Runtime"] = latency_ms(OrtModule(fp32, threads), example)
                lat["INT8 ONNX Runtime"] = latency_ms(OrtModule(int8, threads), example)
    return lat, onnx


@contextlib.contextmanager
def recorded(record: dict[str, Any], what: str) -> Iterator[None]:
    """Run the block; an exception is recorded (``record["error"]``, one line) and warned about
    (:class:`~ptqkit.errors.PTQWarning` ``"<what> failed: ..."``), not raised: the model is
    quantized and saved already, a runtime that cannot take it must not lose the job."""
    try:
        yield
    except Exception as e:
        record["error"] = one_line(e)
        warnings.warn(f"{what} failed: {one_line(e)}", PTQWarning, stacklevel=3)


def time_pt2(
    log: JobLog,
    model: nn.Module,
    qmodel: nn.Module,
    example: tuple | None,
    eval_data: Iterable[Any] | None,
    out: Path | None,
    latency: bool = True,
) -> tuple[dict[str, float], dict[str, Any]]:
    """The PyTorch int8 row: :func:`~ptqkit.export.pt2.export_pt2` (saved as
    ``out/model.int8.pt2``) → :func:`~ptqkit.export.pt2.compile_int8` on ``example``'s batch
    ``B``; its :class:`~ptqkit.export.pt2.KernelCount` (``layers``, ``int_kernels``: conv/linear
    on oneDNN int8 kernels, ``float_kernels``), its top-1 agreement and output SQNR against the
    simulation and against FP32 on ``eval_data`` (run in chunks of ``B``), and its latency at
    batch 1 and ``B`` (``latency_ms``, by batch). Returns ``({PT2_LATENCY: ms at B}, record)``.

    One compiled function per batch size: Inductor's dynamic-shape recompilation of the int8
    graph (a second batch size) fails on oneDNN's channels-last outputs in torch 2.13."""
    lat: dict[str, float] = {}
    rec: dict[str, Any] = {}
    if example is None:
        rec["skipped"] = "the model takes keyword inputs; torch.export needs positional tensors"
        return lat, rec
    from ..export.pt2 import compile_int8

    batch = _batch_of(example)
    with recorded(rec, PT2_ROW):
        path = out / "model.int8.pt2" if out is not None else None
        with log.step("exporting to torch.export (pt2e Q/DQ ops)"):
            program, dynamic = _program(qmodel, example, path)
        if path is not None:
            rec["program"] = str(path)
        with log.step(f"compiling the int8 program with Inductor (batch {batch})"):
            t0 = time.perf_counter()
            compiled = {batch: compile_int8(program, example)}
            rec["compile_s"] = round(time.perf_counter() - t0, 2)
        k = compiled[batch].kernels
        rec.update(layers=k.layers, int_kernels=k.int8, float_kernels=k.float, kernels=k.kernels)
        if eval_data is not None:
            with log.step("checking the Inductor int8 outputs against the simulation and FP32"):
                rec["agreement"] = pt2_agreement(compiled[batch], model, qmodel, eval_data, batch)
        if latency:
            with log.step(f"timing {PT2_ROW}"):
                one = tuple(a[:1] for a in example)
                if batch != 1 and dynamic:
                    compiled[1] = compile_int8(program, one, warn=False)
                rec["latency_ms"] = {
                    str(b): latency_ms(fn, example if b == batch else one)
                    for b, fn in sorted(compiled.items())
                }
                lat[PT2_LATENCY] = rec["latency_ms"][str(batch)]
    return lat, rec


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
        got = select(_chunked(fn, args, batch), None, PT2_ROW, api=None)
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
        out = select(fn(*part), None, PT2_ROW, api=None)
        outs.append(out[: batch - short])
    return torch.cat(outs)
