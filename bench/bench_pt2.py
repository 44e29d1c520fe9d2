"""Int8 inside PyTorch: EfficientNet-Lite0 on scikit-image photo crops, one process per row.

    python bench/bench_pt2.py            # the full run (alone on the machine): writes bench/PT2.md
    python bench/bench_pt2.py --quick    # a check that every row runs: bench/out/PT2.quick.md

Rows, on the same crops (calibration: seed 0, evaluation: seed 1, as ``bench_export.py``):

* FP32 eager, and FP32 ``torch.compile`` (Inductor, freezing on: its packed float kernels);
* ptqkit's simulation (the quantized copy in PyTorch, float fake-quant);
* ptqkit ``export_pt2`` + ``compile_int8`` (the ``torch.export`` program with pt2e Q/DQ ops,
  Inductor with freezing: oneDNN int8 conv/linear);
* ptqkit ``export_onnx`` in ONNX Runtime;
* torchao's pt2e flow with ``X86InductorQuantizer`` (its tutorial: ``torch.export`` →
  ``prepare_pt2e`` → calibration on the same crops → ``convert_pt2e`` → ``torch.compile`` with
  freezing), when torchao is importable; otherwise the row says "not installed".

Per row: top-1 agreement with FP32 eager on the evaluation crops, latency at batch 1 and 32 with
``--threads`` intra-op threads (median and 10th percentile of the wall time, CPU time per call;
``bench_export.latency``), and how many of the model's conv/linear layers ran on integer kernels
(counted in Inductor's generated code, in ONNX Runtime's optimized graph; 0 for eager and the
simulation, which compute in float). Each compiled function serves one batch size (Inductor's
dynamic recompilation of an int8 graph at a second batch size fails in torch 2.13). ptqkit
quantizes once (default ``PTQConfig``) in the parent; each row's process loads that model with
``ptqkit.load``. Results: ``bench/PT2.md`` (``--quick``: ``bench/out/PT2.quick.md``, marked not for
quoting) and ``bench/out/pt2.json``. Not collected by pytest.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_export.py: idle threads sleep

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_export import latency, machine, task  # noqa: E402

import ptqkit  # noqa: E402
from ptqkit.export import OrtModule, export_onnx, kernel_report  # noqa: E402
from ptqkit.export.pt2 import compile_int8, count_kernels, export_pt2  # noqa: E402

MODEL = "efficientnet_lite0"
BATCHES = (1, 32)
ROWS = {
    "fp32_eager": "FP32 eager",
    "fp32_compile": "FP32 torch.compile (Inductor, freezing)",
    "ptqkit_sim": "ptqkit simulation (PyTorch, fake-quant)",
    "ptqkit_pt2": "ptqkit export_pt2 + compile_int8 (Inductor)",
    "ptqkit_ort": "ptqkit export_onnx → ONNX Runtime",
    "torchao_pt2e": "torchao pt2e X86InductorQuantizer → Inductor",
}
Fn = Callable[[torch.Tensor], torch.Tensor]


def conv_linear(model: nn.Module) -> int:
    """How many conv/linear layers the FP32 model has (the denominator of every kernel count)."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return sum(isinstance(m, kinds) for m in model.modules())


# -- one compiled function per batch size ------------------------------------------------------
def inductor(module: nn.Module, x: torch.Tensor, layers: int) -> tuple[Fn, dict[str, Any]]:
    """``torch.compile`` of ``module`` (Inductor, freezing, static shapes) compiled on ``x`` now;
    its conv/linear kernels counted in the generated code (``count_kernels``, as compile_int8)."""
    from torch._inductor.utils import run_and_get_code

    fn = torch.compile(module, backend="inductor", dynamic=False)
    with torch._inductor.config.patch(freezing=True), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, codes = run_and_get_code(fn, x)
    k = count_kernels("\n".join(codes), layers)

    def call(inp: torch.Tensor) -> torch.Tensor:
        with torch._inductor.config.patch(freezing=True), torch.no_grad():
            return fn(inp)

    return call, {"int8": k.int8, "float": k.float, "layers": layers, "kernels": k.kernels}


def build(row: str, work: Path, model: nn.Module, calib: list, xs: dict[int, torch.Tensor]):
    """``({batch: fn}, kernels)`` of one row; ``kernels``: int8 / float conv/linear counts."""
    layers = conv_linear(model)
    floats = {"int8": 0, "float": layers, "layers": layers, "kernels": {}}
    if row == "fp32_eager":
        return {b: model for b in xs}, floats
    if row == "fp32_compile":
        built = {b: inductor(model, x, layers) for b, x in xs.items()}
        return {b: f for b, (f, _) in built.items()}, built[BATCHES[-1]][1]
    qmodel = ptqkit.load(work / "model.ptq.safetensors", model)
    if row == "ptqkit_sim":
        return {b: qmodel for b in xs}, floats
    if row == "ptqkit_pt2":
        program = export_pt2(qmodel, xs[1])
        compiled = {b: compile_int8(program, (x,)) for b, x in xs.items()}
        k = compiled[BATCHES[-1]].kernels
        return compiled, {"int8": k.int8, "float": k.float, "layers": layers, "kernels": k.kernels}
    if row == "ptqkit_ort":
        path = export_onnx(qmodel, work / "ptqkit.int8.onnx", xs[1])
        rep = kernel_report(path)
        ort = OrtModule(path, threads=torch.get_num_threads(), spinning=False)
        kernels = {"int_kernels": rep.int_kernels, "float_kernels": rep.float_kernels}
        return {b: ort for b in xs}, {**kernels, "layers": layers}
    if row == "torchao_pt2e":
        return torchao_rows(model, calib, xs, layers)
    raise SystemExit(f"unknown row {row!r}; rows: {', '.join(ROWS)}")


def torchao_rows(model: nn.Module, calib: list, xs: dict[int, torch.Tensor], layers: int):
    """torchao's pt2e flow exactly as its X86 Inductor tutorial: export, prepare with
    ``X86InductorQuantizer``'s default config, calibrate, convert, compile with freezing."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    batch = torch.export.Dim("batch", min=1)
    example = (torch.cat([xs[1], xs[1]]),)  # a batch of 2: torch.export specializes size 1
    with torch.no_grad():
        exported = torch.export.export(model, example, dynamic_shapes=({0: batch},)).module()
        quantizer = X86InductorQuantizer()
        quantizer.set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for b in calib:
            prepared(b)
        converted = convert_pt2e(prepared)
    built = {b: inductor(converted, x, layers) for b, x in xs.items()}
    return {b: f for b, (f, _) in built.items()}, built[BATCHES[-1]][1]


def run_row(args: argparse.Namespace) -> None:
    """One row in this process: build, predict the evaluation crops, time; ``row.json``."""
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    result: dict[str, Any] = {"row": args.row}
    model, calib, x_eval, _ = task(MODEL, args.calib, args.eval)
    xs = {b: x_eval[:b].contiguous() for b in BATCHES}
    t0 = time.perf_counter()
    try:
        fns, result["kernels"] = build(args.row, work, model, calib, xs)
    except ImportError as e:
        if args.row != "torchao_pt2e":
            raise
        result["error"] = f"not installed: no module {e.name!r} (pip install torchao)"
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    if "error" not in result:
        result["setup_s"] = time.perf_counter() - t0
        big = BATCHES[-1]
        with torch.no_grad():
            preds = [fns[big](x_eval[i : i + big]).argmax(-1) for i in range(0, len(x_eval), big)]
        result["preds"] = torch.cat(preds).tolist()
        result["latency_ms"] = {
            str(b): latency({args.row: fns[b]}, xs[b], args.rounds, args.budget)[args.row]
            for b in BATCHES
        }
    (work / f"{args.row}.json").write_text(json.dumps(result))


# -- the parent: quantize once, one process per row, the table ---------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 crops, short timings: a check")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (torch and ORT)")
    ap.add_argument("--rounds", type=int, default=0, help="timing rounds (0: 3, --quick 1)")
    ap.add_argument("--budget", type=float, default=0.0, help="seconds per round (0: 2, 0.3)")
    ap.add_argument("--calib", type=int, default=0, help="calibration crops (0: 128, --quick 32)")
    ap.add_argument("--eval", type=int, default=0, help="evaluation crops (0: 256, --quick 32)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"), help="json output folder")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.budget = args.budget or (0.3 if args.quick else 2.0)
    args.calib = args.calib or (32 if args.quick else 128)
    args.eval = args.eval or (32 if args.quick else 256)
    if args.eval % BATCHES[-1]:
        raise SystemExit(f"--eval must be a multiple of {BATCHES[-1]}")
    if args.row:
        return run_row(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}\nload average at start: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        model, calib, _, _ = task(MODEL, args.calib, args.eval)
        qmodel = ptqkit.quantize(model, calib, ptqkit.PTQConfig(progress=False))
        ptqkit.save(qmodel, work / "model.ptq.safetensors")
        quantize_s = time.perf_counter() - t0
        print(f"ptqkit quantized {MODEL} in {quantize_s:.0f} s (default PTQConfig)", flush=True)
        rows = [child(r.strip(), args, work) for r in args.rows.split(",")]
    load = os.getloadavg()
    print(f"load average at end: {load}")
    text = table(rows, args, quantize_s, load)
    print("\n" + text)
    md = out / "PT2.quick.md" if args.quick else ROOT / "bench" / "PT2.md"
    md.write_text(text + "\n")
    blob = {"machine": machine(), "command": " ".join(sys.argv), "quick": args.quick}
    (out / "pt2.json").write_text(json.dumps({**blob, "rows": rows}, indent=1))
    print(f"\nwrote {md} and {out / 'pt2.json'}")


def child(row: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run ``row`` in a fresh process (its own threads, allocator and Inductor state)."""
    cmd = [sys.executable, __file__, "--row", row, "--work", str(work)]
    cmd += ["--threads", str(args.threads), "--rounds", str(args.rounds)]
    cmd += ["--budget", str(args.budget), "--calib", str(args.calib), "--eval", str(args.eval)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    path = work / f"{row}.json"
    if not path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        res = {"row": row, "error": f"the process failed (exit {proc.returncode}): {tail[0]}"}
    else:
        res = json.loads(path.read_text())
    res["process_s"] = time.perf_counter() - t0
    print(f"  {ROWS.get(row, row)}: {res.get('error') or 'ok'} ({res['process_s']:.0f} s)")
    return res


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
        + (f", {k['float']} float")
    )


def table(rows: list[dict], args: argparse.Namespace, quantize_s: float, load: Any) -> str:
    ref = next((r["preds"] for r in rows if r["row"] == "fp32_eager" and "preds" in r), None)
    eager = next((r["latency_ms"] for r in rows if r["row"] == "fp32_eager" and "preds" in r), {})
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        "# Int8 inside PyTorch: EfficientNet-Lite0",
        "",
        *(
            ["**`--quick`, machine loaded, not for quoting**: few crops, one short round.", ""]
            if args.quick
            else []
        ),
        f"`python bench/bench_pt2.py{' --quick' if args.quick else ''}`, {when}; {machine()}; "
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
        name = ROWS.get(r["row"], r["row"])
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | | | |")
            continue
        agree = (
            f"{100 * sum(a == b for a, b in zip(r['preds'], ref)) / len(ref):.1f}%" if ref else "?"
        )
        lat = r["latency_ms"]
        cell = lambda v: f"{v['median']:.2f} / {v['p10']:.2f} ({v['cpu']:.2f})"  # noqa: E731
        speed = f"{eager['32']['median'] / lat['32']['median']:.2f}×" if eager else "?"
        lines.append(
            f"| {name} | {agree} | {cell(lat['1'])} | {cell(lat['32'])} | {speed} | "
            f"{kernels_text(r['kernels'])} | {r['setup_s']:.0f} |"
        )
    return "\n".join(head + lines + goals(rows))


def goals(rows: list[dict]) -> list[str]:
    """Issue 26's goals for PyTorch, as measured in this run (batch 32 medians)."""
    ms = {r["row"]: r["latency_ms"]["32"]["median"] for r in rows if "latency_ms" in r}
    if "ptqkit_pt2" not in ms:
        return []
    out = ["", "Goals (issue 26, batch 32):"]
    if "fp32_eager" in ms:
        x = ms["fp32_eager"] / ms["ptqkit_pt2"]
        out.append(f"- ptqkit in Inductor ≥ 5× faster than FP32 eager: {x:.2f}× ({_met(x >= 5)})")
    if "torchao_pt2e" in ms:
        x = ms["torchao_pt2e"] / ms["ptqkit_pt2"]
        out.append(f"- faster than torchao pt2e's model: {x:.2f}× ({_met(x > 1)})")
    else:
        out.append("- faster than torchao pt2e's model: not measured (torchao not installed)")
    return out


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


if __name__ == "__main__":
    main()
