"""The short FP32 vs INT8 table a job prints: metric, agreement and KL, size, latencies; and
which runtimes ran the model on int8 kernels, how many of its layers and how fast
(:func:`int8_runtimes`, in ``summary.json``, the report and the CLI's output)."""

from __future__ import annotations

import math
from typing import Any

from .timing import PT2_LATENCY, PT2_ROW


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


def _cost_row(res: Any) -> list[tuple[str, str, str, str]]:
    """The expected top-1 cost (label-free) where the metric is agreement."""
    cost = getattr(res, "expected_cost", math.nan)
    if res.metric != "agreement" or not math.isfinite(cost):
        return []
    return [("expected top-1 cost", "", f"{cost:.2f} points", "under FP32's probabilities")]


def result_table(
    res: Any, lat: dict[str, float], batch: int = 1, pt2: dict[str, Any] | None = None
) -> str:
    """The short FP32 vs INT8 table of an :class:`~ptqkit.EvalResult` and latencies (measured on
    batches of ``batch`` samples); ``pt2``: the PyTorch int8 record
    (:func:`~ptqkit.report.timing.time_pt2`), for its kernel count."""
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
        *_cost_row(res),
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
        (f"latency {PT2_ROW}", "FP32 PyTorch", PT2_LATENCY, "layers"),
    ):
        if q_key in lat and f_key in lat:
            f, q = lat[f_key], lat[q_key]
            text = "int8 simulated in float (fake-quant)"
            if note:
                text = _speed(f, q)
            if note == "layers" and pt2 and "layers" in pt2:
                text = f"{pt2['int_kernels']}/{pt2['layers']} conv/linear on " + text
            rows.append((label, f"{f:.2f} ms", f"{q:.2f} ms", text))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    lines.append(f"({res.samples} evaluation samples; latency: best of 10 runs, batch {batch})")
    return "\n".join(lines)


def int8_runtimes(
    lat: dict[str, float], onnx: dict[str, Any], pt2: dict[str, Any], batch: int
) -> list[dict[str, Any]]:
    """Every runtime that ran the quantized model on integer kernels: its name, how many
    conv/linear (ONNX: conv/matmul/gemm) ops ran on integer and on float kernels, its latency
    (ms) by batch size, and for PyTorch its agreement with the simulation and FP32."""
    rows: list[dict[str, Any]] = []
    if onnx.get("int8") and "error" not in onnx:
        row = {
            "runtime": "ONNX Runtime",
            "int_kernels": onnx["int_kernels"],
            "float_kernels": onnx["float_kernels"],
            "latency_ms": {},
        }
        if "INT8 ONNX Runtime" in lat:
            row["latency_ms"] = {str(batch): lat["INT8 ONNX Runtime"]}
        rows.append(row)
    if "layers" in pt2 and "error" not in pt2:
        rows.append(
            {
                "runtime": PT2_ROW,
                "layers": pt2["layers"],
                "int_kernels": pt2["int_kernels"],
                "float_kernels": pt2["float_kernels"],
                "latency_ms": dict(pt2.get("latency_ms", {})),
                "agreement": pt2.get("agreement"),
            }
        )
    return rows


def runtime_lines(runtimes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """One ``(runtime, what ran and how fast)`` line per :func:`int8_runtimes` entry: what the
    report's summary and the CLI show."""
    lines = []
    for r in runtimes:
        if "layers" in r:
            kernels = (
                f"{r['int_kernels']}/{r['layers']} conv/linear on oneDNN int8 kernels, "
                f"{r['float_kernels']} float"
            )
        else:
            kernels = (
                f"{r['int_kernels']} integer kernels, {r['float_kernels']} float conv/matmul/gemm"
            )
        speed = ", ".join(f"{ms:.2f} ms at batch {b}" for b, ms in r["latency_ms"].items())
        agree = r.get("agreement") or {}
        if "top1_vs_simulation" in agree:
            agree_text = (
                f"top-1 agreement {agree['top1_vs_simulation']:.2f}% with the "
                f"simulation, {agree['top1_vs_fp32']:.2f}% with FP32 "
                f"({agree['samples']} samples)"
            )
        else:
            agree_text = ""
        lines.append((r["runtime"], "; ".join(t for t in (kernels, speed, agree_text) if t)))
    return lines
