"""all-MiniLM-L6-v2, 4-bit group-wise weights only (issue 25 item 2), in ONNX Runtime: the two
weight-only forms ``export_onnx`` writes, ``weight_only="matmulnbits"`` (ONNX Runtime's
``com.microsoft.MatMulNBits``) and ``weight_only="qdq"`` (``DequantizeLinear`` with
``block_size`` on int4 + ``MatMul``, opset 21), against the FP32 ONNX: latency at batch 32 ×
128 tokens, file size, cosine with ptqkit's simulation and with FP32 (same sentences as
``bench_transformer.py``: Python's own help text).

Both forms are run with ``session.qdq_matmulnbits_accuracy_level = 0`` (ptqkit's
``session_options``: float32 activations, what the simulation computes); one more row runs the
MatMulNBits file with ``accuracy_level = 4`` (activations quantized to int8 per block inside
the kernel: faster, no longer the simulation) for reference.

    python bench/bench_w4_onnx.py [--group 32] [--eval 256] [--write]   # --write: bench/W4_ONNX.md
    python bench/bench_w4_onnx.py --quick                               # checks the script
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _minilm import parser, start
from transformer_onnx import export_fp32, padded

import ptqkit
from ptqkit import PTQConfig, QuantSpec
from ptqkit.export.runtime import session_options
from ptqkit.zoo import text

TOKENS = 128


def _session(path: Path, threads: int):
    import onnxruntime as ort

    return ort.InferenceSession(
        str(path), session_options(threads), providers=["CPUExecutionProvider"]
    )


def _with_accuracy_level(src: Path, dst: Path, level: int) -> Path:
    import onnx

    m = onnx.load(str(src))
    for n in m.graph.node:
        for a in n.attribute:
            if n.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = level
    onnx.save(m, str(dst))
    return dst


def _embed(run, feeds: list[dict]) -> torch.Tensor:
    return torch.cat([torch.as_tensor(run(f)) for f in feeds])


def _cos(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    c = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return float(c.mean()), float(c.min())


def _latency(sess, feed: dict, repeats: int) -> float:
    sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _measure(model, q, tmp: Path, feeds, ref, sim, args) -> list[tuple]:
    """Export FP32 and both weight-only forms into ``tmp``; time and compare each."""
    example = feeds[0]
    ex_t = (torch.from_numpy(example["input_ids"]), torch.from_numpy(example["attention_mask"]))
    names = {"input_names": ["input_ids", "attention_mask"], "output_names": ["embedding"]}
    paths = {"FP32": tmp / "fp32.onnx"}
    export_fp32(model, paths["FP32"], example)
    for form in ("matmulnbits", "qdq"):
        p = ptqkit.export_onnx(q, tmp / f"{form}.onnx", ex_t, weight_only=form, **names)
        paths[f"W4 g{args.group} weight_only='{form}'"] = p
    mnb = paths[f"W4 g{args.group} weight_only='matmulnbits'"]
    paths["MatMulNBits, accuracy_level=4 (int8 A)"] = _with_accuracy_level(
        mnb, tmp / "mnb_acc4.onnx", 4
    )
    rows = []
    for label, p in paths.items():
        sess = _session(p, args.threads)
        emb = _embed(lambda f, s=sess: s.run(None, f)[0], feeds)
        one = {k: v[:1] for k, v in example.items()}
        rows.append(
            (
                label,
                _latency(sess, example, args.repeats),
                _latency(sess, one, 4 * args.repeats),
                p.stat().st_size / 2**20,
                _cos(emb, sim),
                _cos(emb, ref),
            )
        )
    return rows


def main() -> None:
    ap = parser(__doc__, calib=64, evals=256, group=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write", action="store_true", help="write bench/W4_ONNX.md")
    args = ap.parse_args()
    if args.quick:
        args.calib, args.eval, args.repeats = 32, 32, 1
    run = start(args)
    load0, calib, evals = run.load0, text.sentence_batches(run.calib, 32), run.evals
    feeds = [padded(text.tokenize(evals[i : i + 32]), TOKENS) for i in range(0, len(evals), 32)]
    model = text.minilm()
    w4 = QuantSpec(bits=4, symmetric=True, per_channel=True, group_size=args.group)
    q = ptqkit.quantize(model, calib, PTQConfig(activations=None, weights=w4, progress=False))

    def torch_run(m):
        return lambda f: m(**{k: torch.from_numpy(v) for k, v in f.items()})

    with torch.no_grad():
        ref, sim = _embed(torch_run(model), feeds), _embed(torch_run(q), feeds)
    with tempfile.TemporaryDirectory(prefix="w4onnx_") as d:
        rows = _measure(model, q, Path(d), feeds, ref, sim, args)
    import onnxruntime as ort

    base, base1 = rows[0][1], rows[0][2]
    lines = [
        f"# all-MiniLM-L6-v2, W4 g{args.group} weights only, in ONNX Runtime",
        "",
        f"`python bench/bench_w4_onnx.py{' --quick' if args.quick else ''}`: onnxruntime "
        f"{ort.__version__}, CPU, {args.threads} thread(s), batch 32 × {TOKENS} tokens, median of "
        f"{args.repeats}; {len(evals)} sentences; symmetric int4, group {args.group}, nearest "
        f"rounding. Load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end.",
        "",
        "| model | ms, batch 32 | vs FP32 | ms, batch 1 | vs FP32 | MB "
        "| cos vs simulation (mean / min) | cos vs FP32 (mean / min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, ms, ms1, mb, (cs, cs_min), (cf, cf_min) in rows:
        lines.append(
            f"| {label} | {ms:.1f} | {base / ms:.2f}× | {ms1:.2f} | {base1 / ms1:.2f}× | {mb:.1f} "
            f"| {cs:.6f} / {cs_min:.6f} "
            f"| {cf:.4f} / {cf_min:.4f} |"
        )
    print("\n".join(lines))
    if args.write:
        Path(__file__).with_name("W4_ONNX.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
