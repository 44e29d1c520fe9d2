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
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformer_configs import ALPHA, configs, fmt, quantize
from transformer_onnx import onnx_section

from ptqkit.quant.modules import act_quants
from ptqkit.zoo import text

OUT = Path(__file__).resolve().parent / "out"


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
