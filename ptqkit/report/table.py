"""The short FP32 vs INT8 table a job prints: metric, agreement and KL, size, latencies."""

from __future__ import annotations

from typing import Any


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
