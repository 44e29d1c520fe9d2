"""Deployed int8: ptqkit's ONNX QDQ export in ONNX Runtime, against the FP32 ONNX, FP32 PyTorch
eager, and ONNX Runtime's own quantizer (``quantize_static``: QDQ, per-channel, QUInt8
activations / QInt8 weights, MinMax, the same calibration samples) of the same FP32 ONNX.

    python bench/bench_export.py                          # resnet_fmnist, mobilenetv2_fmnist,
                                                          # efficientnet_lite0
    python bench/bench_export.py --models resnet_fmnist --threads 2 --rounds 3

For each model: simulation-vs-ONNX-Runtime parity (top-1 agreement, largest output difference in
8-bit steps of the output range), accuracy (Fashion-MNIST labels) or top-1 agreement with FP32
(EfficientNet-Lite0 on photo crops, no labels here), latency at batch 1 and 32 with ``--threads``
intra-op threads (medians over interleaved rounds, so a load spike hits every variant alike),
file sizes, and the integer kernels / float convs left in the graph ONNX Runtime runs. Results:
a Markdown table on stdout and ``bench/out/export.json``. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

# idle OpenMP threads sleep instead of spinning: on a shared machine a spinning torch thread
# pool makes eager latency depend on the other processes more than on the model (measured here:
# EfficientNet-Lite0 batch 1 took 1 s of wall time at 2 threads, 0.14 s at 1 thread)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ptqkit  # noqa: E402
from ptqkit.export import OrtModule, export_onnx, kernel_report, parity  # noqa: E402

MODELS = ("resnet_fmnist", "mobilenetv2_fmnist", "efficientnet_lite0")
STATS = ("median", "p10", "cpu")


# -- data --------------------------------------------------------------------------------------
def task(name: str, n_calib: int, n_eval: int):
    """``(model, calibration batches, eval inputs, eval labels or None)``."""
    from ptqkit import zoo

    model = zoo.pretrained(name).eval()
    if name == "efficientnet_lite0":
        calib = zoo.photo_crops(n_calib, seed=0)
        x_eval, y_eval = zoo.photo_crops(n_eval, seed=1), None
    else:
        x_train, _, x_test, y_test = zoo.task_data(name)
        idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:n_calib]
        calib, x_eval, y_eval = x_train[idx], x_test[:n_eval], y_test[:n_eval]
    return model, list(calib.split(32)), x_eval, y_eval


# -- the four variants -------------------------------------------------------------------------
def export_fp32(model: torch.nn.Module, path: Path, example: torch.Tensor) -> Path:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    return path


def feed_reader(feeds: list[dict]):
    """ONNX Runtime's calibration reader over ``feeds`` (input name -> array, one per batch)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    return Reader()


def ort_quantize(
    fp32: Path,
    out: Path,
    calib: list[torch.Tensor],
    method: str = "MinMax",
    reduce_range: bool = False,
) -> Path:
    """ONNX Runtime's ``quantize_static`` after its recommended ``quant_pre_process``;
    ``method`` names its ``CalibrationMethod`` (MinMax, Entropy, Percentile, Distribution).
    ``reduce_range``: 7-bit weights, ONNX Runtime's documented remedy for the saturation of its
    u8s8 kernels on x86 CPUs with AVX2 but without VNNI (measured on resnet_fmnist on this
    machine: 86.25% top-1 with 8-bit weights, 92.2% with reduce_range, 92.3% when the same
    QDQ file runs with graph optimizations off, i.e. without the int8 kernels)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.stem + ".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre))
    except Exception as e:  # keep going on the raw model
        print(f"  quant_pre_process failed ({type(e).__name__}: {e}); using the raw FP32 ONNX")
        pre = fp32
    quantize_static(
        str(pre),
        str(out),
        feed_reader([{"input": b.numpy()} for b in calib]),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod[method],
    )
    return out


# -- measurement -------------------------------------------------------------------------------
def latency(variants: dict, x: torch.Tensor, rounds: int, budget_s: float) -> dict[str, dict]:
    """Per variant: median and 10th-percentile wall milliseconds per call on ``x``, and CPU
    milliseconds per call (process time: the work done, little affected by other processes).
    ``rounds`` rounds each run every variant in turn (2 warm-up calls, then about ``budget_s``
    seconds of timed calls), so a load spike hits all variants alike."""
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in variants.items():
                fn(x)
                t0 = time.perf_counter()
                fn(x)
                one = time.perf_counter() - t0
                n = max(3, min(200, int(budget_s / max(one, 1e-6))))
                c0 = time.process_time()
                for _ in range(n):
                    t0 = time.perf_counter()
                    fn(x)
                    wall[name].append(time.perf_counter() - t0)
                cpu[name].append((time.process_time() - c0) / n)
    return {
        k: {
            "median": 1e3 * statistics.median(wall[k]),
            "p10": 1e3 * float(np.percentile(wall[k], 10)),
            "cpu": 1e3 * statistics.median(cpu[k]),
        }
        for k in variants
    }


def top1(fn, x: torch.Tensor, bs: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i : i + bs]).argmax(-1) for i in range(0, len(x), bs)])


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    )


def bench(name: str, args: argparse.Namespace, out: Path) -> dict:
    effnet = name == "efficientnet_lite0"
    n_calib = args.calib or (64 if effnet else 512)
    n_eval = args.eval or (64 if effnet else 2000)
    t0 = time.perf_counter()
    model, calib, x_eval, y_eval = task(name, n_calib, n_eval)
    print(f"\n== {name}: {n_calib} calibration samples, {n_eval} eval samples", flush=True)
    cfg = ptqkit.PTQConfig(calibration="minmax", bias_correction=False, progress=False)
    qmodel = ptqkit.quantize(model, calib, cfg)
    example = x_eval[:1]
    paths = {
        "int8": export_onnx(qmodel, out / f"{name}.int8.onnx", example),
        "fp32": export_fp32(model, out / f"{name}.fp32.onnx", example),
    }
    paths["ort_qdq"] = ort_quantize(paths["fp32"], out / f"{name}.ort_qdq.onnx", calib)
    print(f"  quantized and exported in {time.perf_counter() - t0:.0f} s", flush=True)

    ort = {k: OrtModule(p, threads=args.threads, spinning=False) for k, p in paths.items()}
    par = parity(qmodel, ort["int8"], list(x_eval.split(256)))
    ref = top1(model, x_eval)
    preds = {
        "fp32": ref,
        "ptqkit_sim": top1(qmodel, x_eval),
        "ptqkit_ort": top1(ort["int8"], x_eval),
        "ort_quantizer": top1(ort["ort_qdq"], x_eval),
    }
    quality = {
        k: 100.0 * float((p == (ref if y_eval is None else y_eval)).float().mean())
        for k, p in preds.items()
    }
    kernels = {k: kernel_report(paths[k]) for k in ("int8", "ort_qdq")}
    for k, rep in kernels.items():
        print(f"  {k}: {rep.summary()}")

    torch.set_num_threads(args.threads)
    variants = {
        "ptqkit_int8": ort["int8"],
        "fp32_ort": ort["fp32"],
        "fp32_eager": model,
        "ort_quantizer": ort["ort_qdq"],
    }
    lat = {}
    for bs in (1, 32):
        x = x_eval[:bs] if len(x_eval) >= bs else x_eval.repeat(bs // len(x_eval) + 1, 1, 1, 1)[:bs]
        budget = args.budget * (0.5 if effnet and bs == 32 else 1.0)
        lat[bs] = latency(variants, x.contiguous(), args.rounds, budget)
        print(
            f"  batch {bs} (median / p10 wall, cpu ms): "
            + ", ".join(
                f"{k} {v['median']:.2f} / {v['p10']:.2f}, {v['cpu']:.2f}"
                for k, v in lat[bs].items()
            ),
            flush=True,
        )
    sizes = {k: p.stat().st_size for k, p in paths.items()}
    return {
        "model": name,
        "calibration_samples": n_calib,
        "eval_samples": n_eval,
        "quality_metric": "top-1 agreement with FP32 (%)" if y_eval is None else "top-1 (%)",
        "quality": quality,
        "parity": {
            "top1_agreement": par.top1_agreement,
            "max_abs_diff": par.max_abs_diff,
            "step": par.step,
            "max_steps": par.max_steps,
        },
        "latency_ms": {str(b): v for b, v in lat.items()},
        "speedup_vs_fp32_ort": {
            str(b): {s: v["fp32_ort"][s] / v["ptqkit_int8"][s] for s in STATS}
            for b, v in lat.items()
        },
        "vs_ort_quantizer": {
            str(b): {s: v["ort_quantizer"][s] / v["ptqkit_int8"][s] for s in STATS}
            for b, v in lat.items()
        },
        "size_bytes": sizes,
        "size_ratio_int8_fp32": sizes["int8"] / sizes["fp32"],
        "kernels": {
            k: {"int": rep.int_kernels, "float_conv_matmul_gemm": rep.float_kernels}
            for k, rep in kernels.items()
        },
    }


def table(rows: list[dict]) -> str:
    """Markdown: one row per model and batch size; times as ``median / p10 (cpu)`` ms."""
    head = (
        "| model | batch | ptqkit int8 | FP32 ORT | FP32 eager | ORT quantizer | "
        "speed-up vs FP32 ORT (median / p10 / cpu) | ORT-quantizer ÷ ptqkit (median / p10 / cpu) |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for b in ("1", "32"):
            lat, sp, vs = r["latency_ms"][b], r["speedup_vs_fp32_ort"][b], r["vs_ort_quantizer"][b]
            cell = lambda v: f"{v['median']:.2f} / {v['p10']:.2f} ({v['cpu']:.2f})"  # noqa: E731
            ratio = lambda d: " / ".join(f"{d[s]:.2f}" for s in STATS)  # noqa: E731
            lines.append(
                f"| {r['model']} | {b} | {cell(lat['ptqkit_int8'])} | {cell(lat['fp32_ort'])} | "
                f"{cell(lat['fp32_eager'])} | {cell(lat['ort_quantizer'])} | {ratio(sp)} | "
                f"{ratio(vs)} |"
            )
    lines += [
        "",
        "| model | parity: top-1 agreement / max diff (8-bit steps of the output range) | "
        "quality: FP32 / ptqkit sim / ptqkit ORT / ORT quantizer | int8 size / FP32 size | "
        "ORT-quantizer size / FP32 size |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        q, p, size = r["quality"], r["parity"], r["size_bytes"]
        lines.append(
            f"| {r['model']} | {p['top1_agreement']:.1f}% / {p['max_steps']:.2f} | "
            f"{q['fp32']:.1f} / {q['ptqkit_sim']:.1f} / {q['ptqkit_ort']:.1f} / "
            f"{q['ort_quantizer']:.1f} ({r['quality_metric']}) | "
            f"{size['int8'] / 1e6:.3f} / {size['fp32'] / 1e6:.3f} MB "
            f"({100 * r['size_ratio_int8_fp32']:.1f}%) | "
            f"{100 * size['ort_qdq'] / size['fp32']:.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (ORT and torch)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per variant per round")
    ap.add_argument("--calib", type=int, default=0, help="calibration samples (0: default)")
    ap.add_argument("--eval", type=int, default=0, help="evaluation samples (0: default)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"), help="output folder")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    print(f"load average at start: {os.getloadavg()}")
    rows = []
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for name in args.models.split(","):
            rows.append(bench(name.strip(), args, Path(tmp)))
    print(f"load average at end: {os.getloadavg()}")
    print("\n" + table(rows))
    result = {"machine": machine(), "command": " ".join(sys.argv), "results": rows}
    (out / "export.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out / 'export.json'}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
