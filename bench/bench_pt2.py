"""Int8 inside PyTorch and where PyTorch models are deployed: EfficientNet-Lite0 on scikit-image
photo crops, one process per row.

    python bench/bench_pt2.py            # the full run (alone on the machine): writes bench/PT2.md
    python bench/bench_pt2.py --quick    # a check that every row runs: bench/out/PT2.quick.md
    python bench/bench_pt2.py --quick --rows fp32_ov,ptqkit_ov   # some rows only

Rows, on the same crops (calibration: seed 0, evaluation: seed 1, as ``bench_export.py``):

* FP32 eager, FP32 ``torch.compile`` (Inductor, freezing on: its packed float kernels), FP32
  OpenVINO (``INFERENCE_PRECISION_HINT`` pinned to f32);
* ptqkit's simulation (the quantized copy in PyTorch, float fake-quant);
* ptqkit ``export_pt2`` + ``compile_int8`` (the ``torch.export`` program with pt2e Q/DQ ops,
  Inductor with freezing: oneDNN int8 conv/linear), and the anchor on that runtime: torchao's
  pt2e flow with ``X86InductorQuantizer`` (its tutorial: ``torch.export`` → ``prepare_pt2e`` →
  calibration on the same crops → ``convert_pt2e`` → ``torch.compile`` with freezing);
* ptqkit ``export_onnx`` in ONNX Runtime;
* ptqkit ``export_onnx(target="openvino")`` in OpenVINO, and NNCF's ``nncf.quantize`` → OpenVINO;
* ptqkit ``export_pte`` in ExecuTorch's XNNPACK runtime, and ExecuTorch's ``XNNPACKQuantizer``
  flow → the same runtime (``deploy_rows.py`` says how each deployment row is built).

A row whose package is not importable says "not installed: … (pip install …)". A row whose
package lives in another environment (a venv made because its pins clash with this one's torch)
runs under ``--python-ov PATH`` (OpenVINO/NNCF rows) or ``--python-et PATH`` (ExecuTorch rows).

Per row: top-1 agreement with FP32 eager on the evaluation crops, latency at batch 1 and 32 with
``--threads`` intra-op threads (median and 10th percentile of the wall time, CPU time per call;
``bench_export.latency``), and how many of the model's conv/linear layers ran on integer kernels
(counted in Inductor's generated code, in ONNX Runtime's optimized graph, in OpenVINO's execution
graph, in the XNNPACK graphs ExecuTorch delegated; 0 for eager and the simulation, which compute
in float). Each compiled function serves one batch size (Inductor's dynamic recompilation of an
int8 graph at a second batch size fails in torch 2.13). ptqkit quantizes once (default
``PTQConfig``) in the parent; each row's process loads that model with ``ptqkit.load``. Results:
``bench/PT2.md`` (``--quick``: ``bench/out/PT2.quick.md``, marked not for quoting) and
``bench/out/pt2.json``. Not collected by pytest.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_export.py: idle threads sleep

import argparse
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
from deploy_rows import BUILDERS, RUNTIME, Ctx, row_error, versions  # noqa: E402
from deploy_rows import ROWS as DEPLOY  # noqa: E402
from pt2_table import table  # noqa: E402

import ptqkit  # noqa: E402
from ptqkit.export import OrtModule, export_onnx, kernel_report  # noqa: E402
from ptqkit.export.pt2 import compile_int8, count_kernels, export_pt2  # noqa: E402

MODEL = "efficientnet_lite0"
BATCHES = (1, 32)
ROWS = {
    "fp32_eager": "FP32 eager",
    "fp32_compile": "FP32 torch.compile (Inductor, freezing)",
    "fp32_ov": DEPLOY["fp32_ov"],
    "ptqkit_sim": "ptqkit simulation (PyTorch, fake-quant)",
    "ptqkit_pt2": "ptqkit export_pt2 + compile_int8 (Inductor)",
    "torchao_pt2e": "torchao pt2e X86InductorQuantizer → Inductor",
    "ptqkit_ort": "ptqkit export_onnx → ONNX Runtime",
    **{k: v for k, v in DEPLOY.items() if k != "fp32_ov"},
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
    if row in BUILDERS:  # OpenVINO and ExecuTorch rows (deploy_rows.py)
        return BUILDERS[row](Ctx(work, model, calib, xs, layers, torch.get_num_threads()))
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
    except Exception as e:  # a missing package: "not installed: ... (pip install ...)"
        result["error"] = row_error(e)
    result["python"], result["versions"] = sys.executable, versions()
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
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--quick", action="store_true", help="32 crops, short timings: a check")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated: {','.join(ROWS)}")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (torch and ORT)")
    ap.add_argument("--rounds", type=int, default=0, help="timing rounds (0: 3, --quick 1)")
    ap.add_argument("--budget", type=float, default=0.0, help="seconds per round (0: 2, 0.3)")
    ap.add_argument("--calib", type=int, default=0, help="calibration crops (0: 128, --quick 32)")
    ap.add_argument("--eval", type=int, default=0, help="evaluation crops (0: 256, --quick 32)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"), help="json output folder")
    py = "interpreter of the {} rows (a venv that has the package; default: this one)"
    ap.add_argument("--python-ov", default=sys.executable, help=py.format("OpenVINO/NNCF"))
    ap.add_argument("--python-et", default=sys.executable, help=py.format("ExecuTorch"))
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
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := [r for r in names if r not in ROWS]:
        raise SystemExit(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")
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
        rows = [child(r, args, work) for r in names]
    load = os.getloadavg()
    print(f"load average at end: {load}")
    text = table(rows, args, ROWS, quantize_s, load, machine())
    print("\n" + text)
    # the committed table only from a full run of every row; a --rows subset: bench/out
    full = not args.quick and names == list(ROWS)
    kind = "quick" if args.quick else "partial"
    md = ROOT / "bench" / "PT2.md" if full else out / f"PT2.{kind}.md"
    md.write_text(text + "\n")
    blob = {"machine": machine(), "command": " ".join(sys.argv), "quick": args.quick}
    (out / "pt2.json").write_text(json.dumps({**blob, "rows": rows}, indent=1))
    print(f"\nwrote {md} and {out / 'pt2.json'}")


def child(row: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run ``row`` in a fresh process (its own threads, allocator and Inductor state), under
    ``--python-ov`` / ``--python-et`` for the rows :data:`deploy_rows.RUNTIME` names."""
    python = getattr(args, f"python_{RUNTIME[row]}") if row in RUNTIME else sys.executable
    if not Path(python).is_file():
        print(f"  {ROWS[row]}: no interpreter at {python}")
        return {"row": row, "error": f"no interpreter at {python}", "process_s": 0.0}
    cmd = [python, __file__, "--row", row, "--work", str(work)]
    cmd += ["--threads", str(args.threads), "--rounds", str(args.rounds)]
    cmd += ["--budget", str(args.budget), "--calib", str(args.calib), "--eval", str(args.eval)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired as e:
        proc = subprocess.CompletedProcess(cmd, -9, "", f"timed out after {e.timeout:.0f} s")
    path = work / f"{row}.json"
    if not path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        res = {"row": row, "error": f"the process failed (exit {proc.returncode}): {tail[0]}"}
    else:
        res = json.loads(path.read_text())
        res["python_other"] = python != sys.executable
    res["process_s"] = time.perf_counter() - t0
    print(f"  {ROWS.get(row, row)}: {res.get('error') or 'ok'} ({res['process_s']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
