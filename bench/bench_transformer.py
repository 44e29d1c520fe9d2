"""all-MiniLM-L6-v2 (Hugging Face BERT, 36 Linears) quantized by ptqkit: accuracy of the
sentence embeddings against FP32, SmoothQuant, calibration across 2 processes, and the model in
ONNX Runtime against ONNX Runtime's own ``quantize_static``.

    python bench/bench_transformer.py                 # the numbers of bench/TRANSFORMER.md
    python bench/bench_transformer.py --quick         # checks the script (minutes, not numbers)

Data: English sentences from Python's own help text (``ptqkit.zoo.text.sentences``): every 5th
one calibrates (``--calib``), the others evaluate (``--eval``, 1,000 by default); no download.
Metrics: mean (and worst) cosine similarity between FP32 and quantized embeddings, and top-1
retrieval agreement (the nearest other sentence is the same as with FP32).

Sections (each can be skipped):

1. ``accuracy``: W8A8 configs in ptqkit's simulation — weights per tensor / per channel,
   calibrators, SmoothQuant α, and the FFN down-projections kept in float;
2. ``distributed``: calibration of the SmoothQuant config by 2 processes (gloo, 127.0.0.1), each
   on half the calibration sentences, against one process on all of them: ranges must be
   identical; wall times;
3. ``onnx``: FP32 ONNX, ptqkit's QDQ export (:func:`ptqkit.export_onnx`), and ONNX Runtime's
   ``quantize_static`` (QDQ, per-channel, QUInt8/QInt8, MinMax, same calibration sentences) of
   the same FP32 ONNX, once on the 36 Linear MatMuls (what ptqkit quantizes) and once with its
   default op types: accuracy, latency (batch 32 × ``L`` tokens, ``--threads`` threads, median
   of interleaved rounds) and the integer kernels ONNX Runtime runs. ptqkit's exporter has a
   dynamic batch but a fixed sequence length, so every ONNX variant takes ``L`` tokens (the
   longest sentence; padding is masked, so embeddings do not change).

Results: Markdown on stdout, and ``bench/out/transformer.json``. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ptqkit
from ptqkit.quant.modules import act_quants
from ptqkit.zoo import text

OUT = Path(__file__).resolve().parent / "out"
FFN_DOWN = "*layer.?.output.dense"  # the 6 FFN down-projections (not attention.output.dense)
PER_TENSOR = ptqkit.QuantSpec(8, symmetric=True, per_channel=False)
#: SmoothQuant alpha of the configs that use it
ALPHA = 0.5


def configs(quick: bool) -> dict[str, dict]:
    """name -> PTQConfig keyword arguments (W8A8: activations 8-bit asymmetric per tensor)."""
    full = {
        "weights only (W8, float activations)": {"activations": None},
        "per-tensor W, minmax": {"weights": PER_TENSOR},
        "per-channel W, minmax": {},
        "per-channel W, percentile 99.99": {"calibration": "percentile"},
        "per-channel W, mse": {"calibration": "mse"},
        "per-channel W, kl": {"calibration": "kl"},
        "per-channel W, auto": {"calibration": "auto"},
        f"per-tensor W, minmax, SmoothQuant {ALPHA}": {"weights": PER_TENSOR, "smoothquant": ALPHA},
        "per-channel W, minmax, SmoothQuant 0.3": {"smoothquant": 0.3},
        f"per-channel W, minmax, SmoothQuant {ALPHA}": {"smoothquant": ALPHA},
        "per-channel W, minmax, SmoothQuant 0.7": {"smoothquant": 0.7},
        f"per-channel W, mse, SmoothQuant {ALPHA}": {"calibration": "mse", "smoothquant": ALPHA},
        "per-channel W, minmax, FFN down-proj float": {"skip": (FFN_DOWN,)},
        f"per-channel W, minmax, SmoothQuant {ALPHA}, FFN down-proj float": {
            "smoothquant": ALPHA,
            "skip": (FFN_DOWN,),
        },
    }
    if not quick:
        return full
    return {k: full[k] for k in ("per-channel W, minmax", BEST_W8A8, BEST_MIXED)}


BEST_W8A8 = f"per-channel W, minmax, SmoothQuant {ALPHA}"
BEST_MIXED = f"per-channel W, minmax, SmoothQuant {ALPHA}, FFN down-proj float"


def quantize(model, calib, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ptqkit.PTQWarning)
        cfg = ptqkit.PTQConfig(**{"bias_correction": False, "progress": False, **kw})
        return ptqkit.quantize(model, calib, cfg)


def fmt(r: dict) -> str:
    return f"{r['cosine']:.4f} | {r['min_cosine']:.4f} | {100 * r['top1']:.1f}%"


# -- 1. accuracy ---------------------------------------------------------------------------------
def accuracy(model, calib, eval_sents, ref, quick: bool) -> dict:
    rows = {}
    print("\n## Accuracy (ptqkit simulation)\n")
    print("| config | mean cos | min cos | top-1 retrieval agreement | quantize s |")
    print("|---|---|---|---|---|")
    for name, kw in configs(quick).items():
        t0 = time.perf_counter()
        q = quantize(model, calib, **kw)
        tq = time.perf_counter() - t0
        r = text.embedding_agreement(ref, text.embed(q, eval_sents))
        r.update(quantize_s=tq, layers=len(q.ptq_info.layers), traced=q.ptq_info.traced)
        rows[name] = r
        print(f"| {name} | {fmt(r)} | {tq:.1f} |", flush=True)
    return rows


# -- 2. distributed ------------------------------------------------------------------------------
def shards(n_calib: int) -> list[list[dict]]:
    """The calibration batches of rank 0 (first half of the sentences) and rank 1 (second half).
    One process gets both lists: the same batches, hence the same padding (padding tokens flow
    through the encoder and reach the observers, so other batches would give other ranges)."""
    sents = text.sentences()[::5][:n_calib]
    half = len(sents) // 2
    return [text.sentence_batches(sents[:half], 32), text.sentence_batches(sents[half:], 32)]


def _rank(rank: int, port: int, n_calib: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=300),
    )
    model = text.minilm()
    shard = shards(n_calib)[rank]
    t1 = time.perf_counter()
    q = quantize(model, shard, smoothquant=ALPHA)
    t2 = time.perf_counter()
    ranges = {n: a.range.clone() for n, a in act_quants(q).items()}
    torch.save(
        {
            "ranges": ranges,
            "quantize_s": t2 - t1,
            "start_s": t1 - t0,
            "info": q.ptq_info.details,
            "stages": q.ptq_info.stages,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def distributed(model, n_calib: int) -> dict:
    import torch.multiprocessing as mp

    both = shards(n_calib)
    t0 = time.perf_counter()
    q1 = quantize(model, both[0] + both[1], smoothquant=ALPHA)
    one = time.perf_counter() - t0
    ref = {n: a.range for n, a in act_quants(q1).items()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        mp.spawn(_rank, args=(port, n_calib, d), nprocs=2)
        wall = time.perf_counter() - t0
        ranks = [torch.load(Path(d) / f"rank{r}.pt", weights_only=False) for r in range(2)]
    identical = all(
        set(r["ranges"]) == set(ref) and all(torch.equal(r["ranges"][n], ref[n]) for n in ref)
        for r in ranks
    )
    res = {
        "sentences": n_calib,
        "ranges_identical_to_one_process": identical,
        "quantizers": len(ref),
        "one_process_quantize_s": one,
        "two_process_wall_s": wall,
        "two_process_quantize_s": [r["quantize_s"] for r in ranks],
        "two_process_startup_s": [r["start_s"] for r in ranks],
        "merge_s": [r["stages"]["distributed_merge"] for r in ranks],
    }
    print("\n## Calibration across 2 processes (gloo, loopback)\n")
    print(
        f"SmoothQuant {ALPHA} + minmax on {n_calib} sentences: ranges of all {len(ref)} "
        f"quantizers identical to one process: **{identical}**. One process: quantize() "
        f"{one:.1f} s. Two processes: wall {wall:.1f} s (process start, torch import and model "
        f"load included), quantize() {res['two_process_quantize_s'][0]:.1f} / "
        f"{res['two_process_quantize_s'][1]:.1f} s per rank, of which merging the calibrators "
        f"{1e3 * max(res['merge_s']):.0f} ms (header check, waiting for the slower rank, "
        "exchange and merge)."
    )
    return res


# -- 3. ONNX Runtime -----------------------------------------------------------------------------
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
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

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
        Reader(),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few sentences and configs")
    ap.add_argument("--eval", type=int, default=1000, help="evaluation sentences (>= 1000)")
    ap.add_argument("--calib", type=int, default=256, help="calibration sentences")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (torch and ORT)")
    ap.add_argument("--rounds", type=int, default=5, help="latency rounds")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per round")
    ap.add_argument("--skip", nargs="*", default=[], choices=["accuracy", "distributed", "onnx"])
    args = ap.parse_args()
    if args.quick:
        args.eval, args.calib, args.rounds, args.repeats = 100, 64, 2, 2
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    pool = text.sentences()
    calib_sents = pool[::5][: args.calib]
    eval_sents = [s for i, s in enumerate(pool) if i % 5][: args.eval]
    print(
        f"# all-MiniLM-L6-v2, {len(calib_sents)} calibration / {len(eval_sents)} evaluation "
        f"sentences; torch {torch.__version__}, {args.threads} thread(s), {platform.machine()}"
    )
    model = text.minilm()
    t0 = time.perf_counter()
    ref = text.embed(model, eval_sents)
    print(f"FP32 embeddings: {time.perf_counter() - t0:.1f} s")
    calib = text.sentence_batches(calib_sents, 32)
    results: dict = {"args": vars(args), "eval": len(eval_sents), "calib": len(calib_sents)}
    if "accuracy" not in args.skip:
        results["accuracy"] = accuracy(model, calib, eval_sents, ref, args.quick)
    if "distributed" not in args.skip:
        results["distributed"] = distributed(model, len(calib_sents))
    if "onnx" not in args.skip:
        with tempfile.TemporaryDirectory() as d:
            results["onnx"] = onnx_section(model, calib_sents, eval_sents, ref, args, Path(d))
    OUT.mkdir(exist_ok=True)
    name = "transformer_quick.json" if args.quick else "transformer.json"
    (OUT / name).write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwritten: {OUT / name}")


if __name__ == "__main__":
    main()
