"""Section 3 of bench_transformer.py: all-MiniLM-L6-v2 in ONNX Runtime — ptqkit's QDQ export
against ONNX Runtime's own ``quantize_static`` of the same FP32 ONNX: accuracy, latency and the
integer kernels it runs."""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_export import feed_reader
from transformer_configs import BEST_MIXED, BEST_W8A8, configs, fmt, quantize

import ptqkit
from ptqkit.zoo import text


def padded(batch: dict, length: int) -> dict[str, np.ndarray]:
    pad = length - batch["input_ids"].shape[1]
    return {
        k: torch.nn.functional.pad(v, (0, pad)).numpy().astype(np.int64) for k, v in batch.items()
    }


def export_fp32(model, path: Path, example: dict) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(example["input_ids"]), torch.from_numpy(example["attention_mask"])),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "tokens"},
                "attention_mask": {0: "batch", 1: "tokens"},
            },
        )


def ort_quantize(fp32: Path, out: Path, calib: list[dict], linears_only: bool) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.stem + ".pre.onnx")
    try:
        # symbolic shape inference cannot follow the dynamic token axis through the mask ops
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    except Exception as e:
        print(f"  quant_pre_process failed ({type(e).__name__}: {e}); using the FP32 ONNX")
        pre = fp32
    kw = {}
    if linears_only:  # the MatMuls with a weight initializer: the model's 36 Linears
        m = onnx.load(str(pre))
        inits = {i.name for i in m.graph.initializer}
        kw["nodes_to_quantize"] = [
            n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits
        ]
        kw["op_types_to_quantize"] = ["MatMul"]
    quantize_static(
        str(pre),
        str(out),
        feed_reader(calib),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        **kw,
    )


def ort_session(path: Path, threads: int, optimized: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    if optimized is not None:  # the graph ONNX Runtime runs, after its QDQ fusions
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_ops(path: Path, threads: int) -> dict[str, int]:
    """Op counts of the optimized graph ONNX Runtime runs for ``path``."""
    import onnx

    opt = path.with_name(path.stem + ".optimized.onnx")
    ort_session(path, threads, opt)
    counts: dict[str, int] = {}
    for n in onnx.load(str(opt)).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def is_int_kernel(op: str) -> bool:
    return op.startswith("QLinear") or "Integer" in op or op in ("QGemm", "QAttention")


def onnx_section(model, calib_sents, eval_sents, ref, args, tmp: Path) -> dict:
    import onnxruntime as ort

    tok = text.minilm_tokenizer()
    length = max(len(ids) for ids in tok(calib_sents + eval_sents)["input_ids"])
    example = padded(text.tokenize(eval_sents[:32]), length)
    # ONNX Runtime calibrates on the very batches ptqkit calibrates on (the FP32 export has a
    # dynamic token axis; the evaluation pads every variant to `length`)
    calib_batches = text.sentence_batches(calib_sents, 32)
    calib_np = [{k: v.numpy() for k, v in b.items()} for b in calib_batches]
    paths = {"FP32": tmp / "fp32.onnx"}
    export_fp32(model, paths["FP32"], example)
    notes = {}
    try:
        from ptqkit.export.onnx import export_onnx
    except ImportError:
        export_onnx = None
        notes["ptqkit"] = "ptqkit.export.onnx is not available: ptqkit rows skipped"
    if export_onnx is not None:
        for name in (BEST_W8A8, BEST_MIXED):
            kw = configs(False)[name]
            q = quantize(model, calib_batches, **kw)
            p = tmp / f"ptqkit_{len(paths)}.onnx"
            try:
                export_onnx(
                    q,
                    p,
                    (
                        torch.from_numpy(example["input_ids"]),
                        torch.from_numpy(example["attention_mask"]),
                    ),
                    input_names=["input_ids", "attention_mask"],
                    output_names=["embedding"],
                )
                paths[f"ptqkit: {name}"] = p
            except ptqkit.ExportError as e:
                notes[name] = f"export failed: {e}"
    for linears_only, label in ((True, "36 Linear MatMuls"), (False, "default op types")):
        p = tmp / f"ort_{int(linears_only)}.onnx"
        ort_quantize(paths["FP32"], p, calib_np, linears_only)
        paths[f"ORT quantize_static: {label}"] = p

    sessions, rows = {}, {}
    for k, p in paths.items():
        sessions[k] = ort_session(p, args.threads)
        embs = []
        for i in range(0, len(eval_sents), 64):
            feed = padded(text.tokenize(eval_sents[i : i + 64]), length)
            embs.append(torch.from_numpy(sessions[k].run(None, feed)[0]))
        r = text.embedding_agreement(ref, torch.cat(embs))
        ops = ort_ops(p, args.threads)
        r["int_kernels"] = {op: n for op, n in sorted(ops.items()) if is_int_kernel(op)}
        r["float_matmuls"] = sum(ops.get(op, 0) for op in ("MatMul", "FusedMatMul", "Gemm"))
        r["size_mb"] = p.stat().st_size / 2**20
        rows[k] = r
    # latency: interleaved rounds, median
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.rounds):
        for k, s in sessions.items():
            s.run(None, example)
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                s.run(None, example)
                times[k].append(time.perf_counter() - t0)
    for k in sessions:
        rows[k]["latency_ms"] = 1e3 * statistics.median(times[k])
    base = rows["FP32"]["latency_ms"]
    print(
        f"\n## ONNX Runtime ({ort.__version__}, CPU, {args.threads} thread(s), batch 32 × "
        f"{length} tokens)\n"
    )
    print(
        "| model | mean cos | min cos | top-1 agreement | latency ms | vs FP32 | int8 kernels | "
        "float MatMuls | MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        ints = ", ".join(f"{op} {n}" for op, n in r["int_kernels"].items()) or "none"
        print(
            f"| {k} | {fmt(r)} | {r['latency_ms']:.1f} | {base / r['latency_ms']:.2f}× | {ints} | "
            f"{r['float_matmuls']} | {r['size_mb']:.1f} |"
        )
    for k, v in notes.items():
        print(f"\nNote ({k}): {v}")
    return {"tokens": length, "rows": rows, "notes": notes}
