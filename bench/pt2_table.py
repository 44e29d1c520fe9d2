"""``bench_pt2.py``'s table: one line per row (agreement with FP32 eager, latency, integer-kernel
count), where each row ran (interpreter and optional package versions), and issue 26's goals per
runtime as measured in the run."""

from __future__ import annotations

import datetime
import sys
from typing import Any

#: (ptqkit's row, that runtime's own quantizer's row, the runtime): the goal pairs of issue 26
PAIRS = (
    ("ptqkit_pt2", "torchao_pt2e", "PyTorch Inductor"),
    ("ptqkit_ov", "nncf_ov", "OpenVINO"),
    ("ptqkit_pte", "xnnpack_pt2e", "ExecuTorch XNNPACK"),
)


def kernels_text(k: dict[str, Any]) -> str:
    if "int_kernels" in k:  # ONNX Runtime's optimized graph
        return (
            f"{k['int_kernels']} integer kernels, {k['float_kernels']} float conv/matmul/gemm "
            f"(model: {k['layers']} conv/linear)"
        )
    names = ", ".join(f"{n} ×{c}" for n, c in sorted(k.get("kernels", {}).items()))
    return (
        f"{k['int8']}/{k['layers']} int8"
        + (f" ({names})" if names else "")
        + f", {k['float']} float"
        + (f"; {k['note']}" if k.get("note") else "")
    )


def agreement(row: dict, ref: list | None) -> float | None:
    """Top-1 agreement (%) of ``row``'s predictions with FP32 eager's."""
    if ref is None or "preds" not in row:
        return None
    return 100 * sum(a == b for a, b in zip(row["preds"], ref)) / len(ref)


def table(rows: list[dict], args: Any, labels: dict[str, str], quantize_s: float, load: Any,
          machine: str) -> str:  # fmt: skip
    eager_row = next((r for r in rows if r["row"] == "fp32_eager" and "preds" in r), None)
    ref = eager_row["preds"] if eager_row else None
    eager = eager_row["latency_ms"] if eager_row else {}
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    quick = ["**`--quick`, machine loaded, not for quoting**: few crops, one short round.", ""]
    head = [
        "# Int8 inside PyTorch: EfficientNet-Lite0",
        "",
        *(quick if args.quick else []),
        f"`python bench/bench_pt2.py{''.join(' ' + a for a in sys.argv[1:])}`, {when}; {machine}; "
        f"{args.threads} threads; load average at the end {load[0]:.2f}.",
        "",
        f"{args.calib} calibration crops (seed 0), {args.eval} evaluation crops (seed 1) of "
        f"scikit-image's photos; ptqkit: default `PTQConfig()` ({quantize_s:.0f} s), loaded in "
        "each row's process. Latency: median / p10 wall ms per call (CPU ms), "
        f"{args.rounds} round(s) of about {args.budget:g} s; each row in its own process.",
        "",
        "| row | top-1 agreement with FP32 | batch 1 ms | batch 32 ms | vs FP32 eager at 32 | "
        "conv/linear on integer kernels | setup s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines = []
    for r in rows:
        name = labels.get(r["row"], r["row"])
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | | | |")
            continue
        agree = agreement(r, ref)
        lat = r["latency_ms"]
        cell = lambda v: f"{v['median']:.2f} / {v['p10']:.2f} ({v['cpu']:.2f})"  # noqa: E731
        speed = f"{eager['32']['median'] / lat['32']['median']:.2f}×" if eager else "?"
        lines.append(
            f"| {name} | {f'{agree:.1f}%' if agree is not None else '?'} | {cell(lat['1'])} | "
            f"{cell(lat['32'])} | {speed} | {kernels_text(r['kernels'])} | {r['setup_s']:.0f} |"
        )
    return "\n".join(head + lines + where(rows, labels) + goals(rows, ref))


def where(rows: list[dict], labels: dict[str, str]) -> list[str]:
    """Footnote: rows that ran under another interpreter or imported optional packages."""
    out = []
    for r in rows:
        vers = ", ".join(f"{k} {v}" for k, v in sorted(r.get("versions", {}).items()))
        other = r.get("python_other")
        if vers or other:
            run = f"ran under `{r['python']}`" if other else "ran in the main environment"
            out.append(f"- {labels.get(r['row'], r['row'])}: {run}" + (f"; {vers}" if vers else ""))
    return ["", "Where each row ran:", *out] if out else []


def goals(rows: list[dict], ref: list | None) -> list[str]:
    """Issue 26's goals as measured in this run: per runtime, ptqkit's model ≤ 1.00× the latency
    of that runtime's own quantizer's model (batch 1 and 32 medians), ≥ 8 points more top-1
    agreement, every conv/linear on integer kernels; in Inductor ≥ 5× FP32 eager at batch 32."""
    ok = {r["row"]: r for r in rows if "latency_ms" in r}
    out = ["", "Goals (issue 26):"]
    if "ptqkit_pt2" in ok and "fp32_eager" in ok:
        x = _ms(ok["fp32_eager"], "32") / _ms(ok["ptqkit_pt2"], "32")
        out.append(
            f"- ptqkit in Inductor ≥ 5× faster than FP32 eager at 32: {x:.2f}× ({_met(x >= 5)})"
        )
    for ours, theirs, runtime in PAIRS:
        if ours not in ok:
            continue
        k = ok[ours]["kernels"]
        full = k["int8"] == k["layers"] if "int8" in k else k["float_kernels"] == 0
        out.append(f"- {runtime}: every conv/linear of ptqkit's model on integer kernels: "
                   f"{kernels_text(k).split(';')[0]} ({_met(full)})")  # fmt: skip
        if theirs not in ok:
            out.append(f"- {runtime}: vs its own quantizer: not measured ({theirs} did not run)")
            continue
        for b in ("1", "32"):
            x = _ms(ok[ours], b) / _ms(ok[theirs], b)
            out.append(f"- {runtime} batch {b}: ptqkit ≤ 1.00× {theirs}'s latency: {x:.2f}× "
                       f"({_met(x <= 1.0)})")  # fmt: skip
        a, t = agreement(ok[ours], ref), agreement(ok[theirs], ref)
        if a is not None and t is not None:
            out.append(f"- {runtime}: ≥ 8 points more agreement than {theirs}: {a:.1f}% vs "
                       f"{t:.1f}% ({a - t:+.1f}; {_met(a - t >= 8)})")  # fmt: skip
    return out if len(out) > 2 else []


def _ms(row: dict, batch: str) -> float:
    return float(row["latency_ms"][batch]["median"])


def _met(ok: bool) -> str:
    return "met" if ok else "not met"
