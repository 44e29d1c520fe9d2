"""Timing a job's models: the float and simulated models in PyTorch, and, exported, the ONNX
Runtime float and int8 models (with how many conv/matmul/gemm ops ran on integer kernels)."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import PTQWarning, one_line


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
