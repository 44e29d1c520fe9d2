"""The int8 runtimes a job runs the quantized model on, as a registry (:data:`RUNTIMES`, name →
:class:`Runtime`): ONNX Runtime (the QDQ ONNX file), PyTorch Inductor (the ``torch.export``
program with pt2e Q/DQ ops compiled by ``torch.compile``), OpenVINO (the ONNX file on its CPU
plugin, float parts pinned to f32) and ExecuTorch with XNNPACK (the ``.pte`` program).

Each runtime says how to build it (``export``: the model → a callable that runs it on integer
kernels, for one batch size or all) and how to count what it ran (``count``: how many of the
model's conv/linear layers ran on integer kernels and how many on float ones, from the runtime's
own graph). :func:`time_runtime` does the rest the same way for all of them: the outputs are
compared with the simulation and with FP32 on the evaluation data
(:func:`~ptqkit.report.timing.pt2_agreement`: top-1 agreement and output SQNR
``10·log10(Σ ref² / Σ (ref - int8)²)``), and the latency is measured at batch 1 and at the job's
latency batch. A runtime whose package is missing is recorded as ``not installed (pip install
…)``; one that fails is recorded and warned about (:func:`~ptqkit.report.timing.recorded`);
neither stops the job."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError
from .timing import (
    JobLog,
    Skipped,
    _batch_of,
    _program,
    latency_ms,
    pt2_agreement,
    recorded,
)

#: the PyTorch int8 row: its name in the table, the report and ``summary.json``, its latency key
PT2_ROW = "PyTorch int8 (Inductor)"
PT2_LATENCY = "INT8 PyTorch Inductor"


@dataclasses.dataclass
class Context:
    """What a runtime is built from: the float and quantized models, the example (its batch is
    the latency batch), the evaluation data, the output folder, the ONNX export's record and
    the job's log. ``scratch`` keeps what a runtime's second batch size reuses."""

    model: nn.Module
    qmodel: nn.Module
    example: tuple
    eval_data: Iterable[Any] | None
    out: Path | None
    onnx: dict[str, Any]
    log: JobLog
    scratch: dict[str, Any] = dataclasses.field(default_factory=dict)


#: ``export(context, example, record)`` → a callable for ``example``'s batch size; ``record``
#: is ``None`` for the batch-1 build of a runtime built per batch size (``None`` back: not there)
Export = Callable[[Context, tuple, "dict[str, Any] | None"], Any]


@dataclasses.dataclass(frozen=True)
class Runtime:
    """One int8 runtime: ``key`` (``--runtimes``, ``JobOptions.runtimes``), ``name`` (its row),
    ``modules`` it imports (one missing: not installed, ``pip`` installs it), ``latency`` (its
    key in ``latency_ms``), ``export`` and ``count`` (the callable → ``layers``,
    ``int_kernels``, ``float_kernels`` and what else the runtime reports), ``kernels`` (what its
    integer kernels are called), ``per_batch``: built again for batch 1."""

    key: str
    name: str
    modules: tuple[str, ...]
    pip: str
    latency: str
    export: Export
    count: Callable[[Any], dict[str, Any]]
    kernels: str
    per_batch: bool = False


#: loggers that warn while ExecuTorch is imported, about nothing a job does: torchao's CUDA
#: kernels that do not load on a CPU machine, torch's pytree registration of an Enum
IMPORT_NOISE = ("torchao", "torch.utils._pytree")


def installed(modules: Sequence[str]) -> bool:
    """Whether every module imports (through ``__import__``, as an ``import`` statement), with
    the :data:`IMPORT_NOISE` loggers' warnings held back while they import."""
    loggers = [logging.getLogger(name) for name in IMPORT_NOISE]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        for name in modules:
            __import__(name)
    except ImportError:
        return False
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return True


def _onnx_file(ctx: Context) -> Path:
    if "int8" not in ctx.onnx:
        why = ctx.onnx.get("error") or ctx.onnx.get("skipped") or "the job exported no ONNX"
        raise Skipped(f"no int8 ONNX file ({why})")
    return Path(ctx.onnx["int8"])


def _threads() -> int:
    import torch

    return torch.get_num_threads()  # the same as PyTorch's, for a fair comparison


def _ort(ctx: Context, example: tuple, rec: dict[str, Any] | None) -> Any:
    """The job's ``model.int8.onnx`` in an ONNX Runtime session."""
    from ..export import OrtModule

    path = _onnx_file(ctx)
    return OrtModule(path, _threads())


#: ONNX Runtime's integer kernels that are a conv/linear (its others: add, pool, concat, ...)
ORT_LAYER_KERNELS = (
    "QLinearConv",
    "QLinearConvTranspose",
    "ConvInteger",
    "QLinearMatMul",
    "QGemm",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
)


def _ort_count(module: Any) -> dict[str, Any]:
    """Conv/linear on integer kernels (of ONNX Runtime's optimized graph), float conv/matmul/
    gemm, and ``integer_ops``: every op on an integer kernel (adds and pools too)."""
    from ..export import kernel_report

    rep = kernel_report(module.path)
    n, f = sum(rep.ops.get(k, 0) for k in ORT_LAYER_KERNELS), rep.float_kernels
    return {"layers": n + f, "int_kernels": n, "float_kernels": f, "integer_ops": rep.int_kernels}


def _inductor(ctx: Context, example: tuple, rec: dict[str, Any] | None) -> Any:
    """:func:`~ptqkit.export.pt2.export_pt2` (``out/model.int8.pt2``) compiled by
    :func:`~ptqkit.export.pt2.compile_int8` for ``example``'s batch size. One compiled
    function per batch size: Inductor's dynamic-shape recompilation of the int8 graph fails on
    oneDNN's channels-last outputs in torch 2.13."""
    from ..export.pt2 import compile_int8

    if rec is None:  # batch 1, from the same program when its batch is free
        program, dynamic = ctx.scratch["pt2"]
        return compile_int8(program, example, warn=False) if dynamic else None
    path = ctx.out / "model.int8.pt2" if ctx.out is not None else None
    with ctx.log.step("exporting to torch.export (pt2e Q/DQ ops)"):
        program, dynamic = _program(ctx.qmodel, example, path)
    ctx.scratch["pt2"] = program, dynamic
    if path is not None:
        rec["program"] = str(path)
    with ctx.log.step(f"compiling the int8 program with Inductor (batch {_batch_of(example)})"):
        t0 = time.perf_counter()
        compiled = compile_int8(program, example)
        rec["compile_s"] = round(time.perf_counter() - t0, 2)
    return compiled


def _inductor_count(compiled: Any) -> dict[str, Any]:
    k = compiled.kernels
    return {"layers": k.layers, "int_kernels": k.int8, "float_kernels": k.float,
            "kernels": k.kernels}  # fmt: skip


def _openvino(ctx: Context, example: tuple, rec: dict[str, Any] | None) -> Any:
    """The int8 ONNX file on OpenVINO's CPU plugin, ``INFERENCE_PRECISION_HINT`` f32 (no bf16
    on CPUs that have it). The job's file where its weights are int8 (a VNNI CPU); else
    ``export_onnx(target="openvino")`` writes ``model.int8.openvino.onnx`` with int8 weights."""
    from ..export import export_onnx
    from ..export.openvino import OvModule
    from ..export.weights import resolve_weight_dtype

    path = _onnx_file(ctx)
    if resolve_weight_dtype("auto") != "int8":  # the job's file has uint8 weights for ORT
        path = export_onnx(ctx.qmodel, path.with_name("model.int8.openvino.onnx"), example,
                           target="openvino")  # fmt: skip
        if rec is not None:
            rec["onnx"] = str(path)
    return OvModule(path, precision="f32", threads=_threads())


def _openvino_count(module: Any) -> dict[str, Any]:
    p = module.precisions()
    return {
        "layers": len(p.layers),
        "int_kernels": p.int8,
        "float_kernels": len(p.layers) - p.int8,
        "inference_precision": p.inference_precision,
        "layer_precisions": {x.name: f"{x.layer_type} {x.precision}" for x in p.layers},
    }


def _executorch(ctx: Context, example: tuple, rec: dict[str, Any] | None) -> Any:
    """:func:`~ptqkit.export.executorch.export_pte` for ``example``'s shape (ExecuTorch plans
    memory for a static shape): ``out/model.int8.pte``, run by ExecuTorch's runtime."""
    from ..export.executorch import export_pte

    path = ctx.out / "model.int8.pte" if ctx.out is not None and rec is not None else None
    with ctx.log.step(f"lowering to ExecuTorch with XNNPACK (batch {_batch_of(example)})"):
        module = export_pte(ctx.qmodel, example, path)
    if path is not None and rec is not None:
        rec["program"] = str(path)
    return module


def _executorch_count(module: Any) -> dict[str, Any]:
    d = module.delegation
    return {
        "layers": d.layers,
        "int_kernels": d.int8_layers,
        "float_kernels": None if d.int8_layers is None else d.layers - d.int8_layers,
        "outside_delegate": d.outside_layers,
        "partitions": d.partitions,
        "delegated_nodes": d.delegated_nodes,
        "other_nodes": d.other_nodes,
    }


#: every int8 runtime a job can run, in the order of its rows
RUNTIMES: dict[str, Runtime] = {
    r.key: r
    for r in (
        Runtime("onnxruntime", "ONNX Runtime", ("onnxruntime",), "pip install onnxruntime",
                "INT8 ONNX Runtime", _ort, _ort_count, "integer kernels"),
        Runtime("inductor", PT2_ROW, ("torch",), "pip install torch", PT2_LATENCY, _inductor,
                _inductor_count, "oneDNN int8 kernels", per_batch=True),
        Runtime("openvino", "OpenVINO", ("openvino",), "pip install 'ptqkit[openvino]'",
                "INT8 OpenVINO", _openvino, _openvino_count, "OpenVINO int8 kernels"),
        Runtime("executorch", "ExecuTorch (XNNPACK)", ("executorch.exir", "executorch.runtime"),
                "pip install 'ptqkit[executorch]'", "INT8 ExecuTorch XNNPACK", _executorch,
                _executorch_count, "XNNPACK qs8 kernels", per_batch=True),
    )
}  # fmt: skip


def select(names: Sequence[str] | None, pt2: bool = True) -> list[Runtime]:
    """The runtimes named (``None``: all of them, in :data:`RUNTIMES`' order); ``pt2=False``
    leaves Inductor out. An unknown name is a :class:`~ptqkit.errors.ConfigError` listing the
    known ones."""
    if isinstance(names, str):
        raise ConfigError(f"runtimes must be a tuple of names (of {','.join(RUNTIMES)}), "
                          f"got the string {names!r}")  # fmt: skip
    keys = list(RUNTIMES) if names is None else list(dict.fromkeys(names))
    unknown = [k for k in keys if k not in RUNTIMES]
    if unknown:
        raise ConfigError(f"unknown runtime(s) {unknown}; known: {','.join(RUNTIMES)}")
    return [RUNTIMES[k] for k in keys if pt2 or k != "inductor"]


def time_runtime(rt: Runtime, ctx: Context) -> tuple[dict[str, float], dict[str, Any]]:
    """Build ``rt`` on ``ctx.example``'s batch ``B``, count its layers, compare its outputs with
    the simulation and FP32 on ``ctx.eval_data`` (chunks of ``B``), time it at batch 1 and
    ``B``. Returns ``({rt.latency: ms at B}, record)``; the record has ``status`` (not
    installed), ``skipped`` or ``error`` where it did not run, and ``seconds``: all of it."""
    lat: dict[str, float] = {}
    rec: dict[str, Any] = {}
    t0 = time.perf_counter()  # from the first import of its package
    if not installed(rt.modules):
        rec["status"] = f"not installed ({rt.pip})"
        return lat, rec
    batch = _batch_of(ctx.example)
    with recorded(rec, rt.name):
        run = rt.export(ctx, ctx.example, rec)
        rec.update(rt.count(run))
        if ctx.eval_data is not None:
            with ctx.log.step(f"checking the {rt.name} outputs against the simulation and FP32"):
                rec["agreement"] = pt2_agreement(run, ctx.model, ctx.qmodel, ctx.eval_data, batch)
        with ctx.log.step(f"timing {rt.name}"):
            one = tuple(a[:1] for a in ctx.example)
            fns = {batch: run}
            if batch != 1:
                fns[1] = rt.export(ctx, one, None) if rt.per_batch else run
            rec["latency_ms"] = {
                str(b): latency_ms(fn, ctx.example if b == batch else one)
                for b, fn in sorted(fns.items())
                if fn is not None
            }
        lat[rt.latency] = rec["latency_ms"][str(batch)]
    rec["seconds"] = round(time.perf_counter() - t0, 2)  # what this runtime added to the job
    return lat, rec


def time_runtimes(
    names: Sequence[str] | None, pt2: bool, ctx: Context | None
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """:func:`time_runtime` for each runtime :func:`select` picks; ``ctx`` ``None`` (a model
    that takes keyword inputs) records each as skipped. Returns the latencies at the example's
    batch and the records by key."""
    lat: dict[str, float] = {}
    records: dict[str, dict[str, Any]] = {}
    for rt in select(names, pt2):
        if ctx is None:
            records[rt.key] = {"skipped": "the model takes keyword inputs; the int8 runtimes "
                               "need positional tensors"}  # fmt: skip
            continue
        got, records[rt.key] = time_runtime(rt, ctx)
        lat.update(got)
    return lat, records


__all__ = [
    "PT2_LATENCY",
    "PT2_ROW",
    "RUNTIMES",
    "Context",
    "Runtime",
    "installed",
    "select",
    "time_runtime",
    "time_runtimes",
]
