"""The short FP32 vs INT8 table a job prints: metric, agreement and KL, size, latencies; and
which runtimes ran the model on int8 kernels, how many of its layers and how fast
(:func:`int8_runtimes`, in ``summary.json``, the report and the CLI's output)."""

from __future__ import annotations

from typing import Any

from .runtimes import RUNTIMES
from .summary import cost_text


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


def result_table(
    res: Any, lat: dict[str, float], batch: int = 1, runtimes: dict[str, Any] | None = None
) -> str:
    """The short FP32 vs INT8 table of an :class:`~ptqkit.EvalResult` and latencies (measured on
    batches of ``batch`` samples); ``runtimes``: the int8 runtimes' records by key
    (:func:`~ptqkit.report.runtimes.time_runtime`), for their layer counts."""
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
        *[("expected top-1 cost", "", c, "under FP32's probabilities") for c in cost_text(res)],
        (
            "size",
            _size(res.size_bytes_fp32),
            _size(res.size_bytes_quantized),
            f"{res.compression:.2f}x smaller" if res.compression else "",
        ),
    ]
    if "FP32 PyTorch" in lat and "INT8 simulated PyTorch" in lat:
        f, q = lat["FP32 PyTorch"], lat["INT8 simulated PyTorch"]
        rows.append(("latency PyTorch", f"{f:.2f} ms", f"{q:.2f} ms",
                     "int8 simulated in float (fake-quant)"))  # fmt: skip
    for rt in RUNTIMES.values():  # ONNX Runtime against its own FP32, the others against eager
        f_key = "FP32 ONNX Runtime" if rt.key == "onnxruntime" else "FP32 PyTorch"
        if rt.latency not in lat or f_key not in lat:
            continue
        f, q = lat[f_key], lat[rt.latency]
        text = _speed(f, q)
        rec = (runtimes or {}).get(rt.key) or {}
        if rec.get("layers"):
            text = f"{rec['int_kernels']}/{rec['layers']} conv/linear on " + text
        rows.append((f"latency {rt.name}", f"{f:.2f} ms", f"{q:.2f} ms", text))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    lines.append(f"({res.samples} evaluation samples; latency: best of 10 runs, batch {batch})")
    return "\n".join(lines)


#: what a runtime's row carries from its record into ``summary["int8_runtimes"]``
ROW_KEYS = ("layers", "int_kernels", "float_kernels", "integer_ops", "latency_ms", "agreement",
            "inference_precision", "layer_precisions", "outside_delegate", "partitions",
            "delegated_nodes", "other_nodes", "compile_s", "seconds")  # fmt: skip


def int8_runtimes(runtimes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every runtime that ran the quantized model on integer kernels (``runtimes``: records by
    key, :func:`~ptqkit.report.runtimes.time_runtime`), in :data:`RUNTIMES`' order: its name,
    how many conv/linear layers ran on integer and on float kernels, its latency (ms) by batch
    size, its agreement with the simulation and FP32; and each runtime asked for whose package
    is missing, with its ``status`` (``not installed (pip install ...)``). A runtime that
    failed or was skipped is not listed (its record says why)."""
    rows: list[dict[str, Any]] = []
    for key, rec in runtimes.items():
        rt = RUNTIMES[key]
        if "status" in rec:
            rows.append({"runtime": rt.name, "status": rec["status"], "latency_ms": {}})
        elif "layers" in rec and "error" not in rec and "skipped" not in rec:
            row: dict[str, Any] = {"runtime": rt.name, "kernel_kind": rt.kernels}
            rows.append(row | {k: rec[k] for k in ROW_KEYS if k in rec})
    return rows


def _count(n: int | None) -> str:
    return "?" if n is None else str(n)


def runtime_lines(runtimes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """One ``(runtime, what ran and how fast)`` line per :func:`int8_runtimes` entry: what the
    report's summary and the CLI show."""
    lines = []
    for r in runtimes:
        if "status" in r:
            lines.append((r["runtime"], r["status"]))
            continue
        kernels = (
            f"{_count(r['int_kernels'])}/{r['layers']} conv/linear on {r['kernel_kind']}, "
            f"{_count(r['float_kernels'])} float"
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
