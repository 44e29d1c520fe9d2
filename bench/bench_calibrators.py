"""Benchmark of ptqkit's range calibrators; writes ``bench/CALIBRATORS.md``.

On the same tensors (1M float32 values each, fixed seed: Gaussian, ReLU of a Gaussian, Laplace,
and a heavy-tailed Student-t df=2 with a few ±1e3 outliers), one run measures:

* the KL (entropy) threshold search on one 2048-bin ``|x|`` histogram with 128 levels:
  ptqkit's vectorized :func:`~ptqkit.calibrate.entropy.kl_divergence_curve`; a straightforward
  loop implementation of the same published TensorRT algorithm (to check that ptqkit picks the
  same threshold); the naive KL loop of the course chapter (seed-chapter-9.2), which for every
  bin threshold re-quantizes all N values and re-histograms them (O(bins × N));
* the full calibrators (``observe`` of 10 batches of 100k values + ``compute_range``) of
  ptqkit's ``kl``, ``mse``, ``percentile``, ``auto_percentile`` (and ``minmax``);
* ONNX Runtime's histogram calibrators (``EntropyCalibrater`` / ``PercentileCalibrater``, i.e.
  ``onnxruntime.quantization.calibrate.HistogramCollector`` fed the same batches);
* for every method: the threshold / range, the time, and the mean squared error of the actual
  samples fake-quantized at 8 bits (int8, symmetric, per tensor) with that range;
* calibrator memory after 10 vs 1000 batches: ptqkit's state size; ONNX Runtime's histogram
  size and the Python-heap peak of its ``collect_data`` (which keeps every batch's outputs).

Run (about 2 minutes on a quiet 2-core machine; the naive loop is extrapolated, see below):

    python bench/bench_calibrators.py

``--quick`` runs on 100k values per distribution and writes to ``--out`` (default
``bench/CALIBRATORS.md``) — for checking the script, not for numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibrators_data import (
    KL_BINS,
    KL_LEVELS,
    N_BATCHES,
    NAIVE_SUBSAMPLE,
    NAIVE_SUBSET,
    SEED,
    make_data,
    memory_batches,
)
from calibrators_md import fmt_t, write_report
from chapter_kl import chapter_kl, kl_loop
from memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from onnxruntime.quantization.calibrate import (
    CalibrationDataReader,
    CalibrationMethod,
    HistogramCollector,
    create_calibrator,
)

from ptqkit.calibrate import make_calibrator
from ptqkit.calibrate.entropy import kl_divergence_curve
from ptqkit.config import QuantSpec
from ptqkit.quant import fake_quant, qparams

SPEC = QuantSpec(bits=8, symmetric=True)  # int8, [-128, 127], scale = max|range| / 127


def abs_histogram(x: np.ndarray) -> tuple[np.ndarray, float]:
    """2048-bin histogram of ``|x|`` over ``[0, max|x|]``, exact zeros left out (the ReLU zero
    spike; zeros are exactly representable), as ptqkit's KL solver sees it."""
    a = np.abs(x.astype(np.float64))
    a = a[a > 0]
    top = float(a.max())
    hist, _ = np.histogram(a, bins=KL_BINS, range=(0.0, top))
    return hist.astype(np.float64), top / KL_BINS


def sample_mse(x: torch.Tensor, lo: float, hi: float) -> float:
    lo, hi = min(lo, hi), max(lo, hi)  # the chapter's loop may return a negative threshold
    scale, zp = qparams(lo, hi, SPEC)
    return float((fake_quant(x, scale, zp, SPEC).double() - x.double()).pow(2).mean())


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[object, float, float]:
    """Result of ``fn``, its median and its minimum wall time (s) over ``repeat`` runs (after
    one warm-up run when repeated)."""
    gc.collect()
    if repeat > 1:
        fn()
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), min(times)


# -- ONNX Runtime --------------------------------------------------------------------------------


def ort_collector(method: str, batches: list[np.ndarray], **kw) -> tuple[float, float, float, int]:
    """ONNX Runtime's histogram calibrator internals (what ``EntropyCalibrater`` /
    ``PercentileCalibrater`` run on each tensor after their session has produced it): collect
    the batches, compute the range. Returns ``(lo, hi, seconds of the range search, bins)``."""
    col = HistogramCollector(method=method, scenario="same", **kw)
    with contextlib.redirect_stdout(io.StringIO()):
        for b in batches:
            col.collect({"t": [b]})
        t0 = time.perf_counter()
        res = col.compute_collection_result()
    search = time.perf_counter() - t0
    lo, hi = res["t"][0], res["t"][1]
    return float(lo), float(hi), search, len(col.get_histogram_dict()["t"][0])


ORT_ENTROPY = {"symmetric": False, "num_bins": 4096, "num_quantized_bins": 256, "percentile": 0}
ORT_ENTROPY_DEFAULT = {"symmetric": False, "num_bins": 128, "num_quantized_bins": 128,
                       "percentile": 0}  # fmt: skip
ORT_PERCENTILE = {"symmetric": True, "num_bins": 2048, "num_quantized_bins": 128,
                  "percentile": 99.99}  # fmt: skip


# -- memory (each measurement in a fresh process) ---------------------------------------------


def ptqkit_state_bytes(cal) -> int:
    stats = getattr(cal, "stats", None)
    tensors = []
    if stats is not None:
        mm = getattr(stats, "minmax", stats)
        tensors += [mm.lo, mm.hi]
        tensors += [getattr(stats, k, None) for k in ("counts", "top", "zeros")]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[np.ndarray]) -> None:
        self.it = iter(batches)

    def get_next(self) -> dict | None:
        b = next(self.it, None)
        return None if b is None else {"x": b}


def _identity_model(size: int, path: Path) -> None:
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)


def memory_child(which: str, n_batches: int, size: int) -> dict[str, float]:
    """One measurement: observe ``n_batches`` batches with ``which`` and report the state size,
    the ``tracemalloc`` peak and the growth of the peak RSS during the observation.

    ``ort-entropy`` is ORT's ``EntropyCalibrater`` through ``create_calibrator`` on an Identity
    model (both its tensors ``x`` and ``y`` are calibrated) and one ``collect_data`` pass."""
    torch.set_num_threads(1)
    batches = memory_batches(n_batches, size)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        if which.startswith("ort"):
            _identity_model(size, Path(tmp) / "identity.onnx")
            cal = create_calibrator(
                Path(tmp) / "identity.onnx",
                augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=CalibrationMethod.Entropy,
                extra_options={"num_bins": 4096, "num_quantized_bins": 256},
            )
        else:
            make_calibrator(which).observe(torch.from_numpy(batches[0]))  # lazy inits of torch
            cal = make_calibrator(which)
        gc.collect()
        reset_peak_rss()
        rss0 = rss_bytes()
        tracemalloc.start()
        if which.startswith("ort"):
            cal.collect_data(_Reader(batches))
        else:
            for b in batches:
                cal.observe(torch.from_numpy(b))
        _, py_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        peak = peak_rss_bytes()
    if which.startswith("ort"):
        hists = cal.collector.get_histogram_dict()
        state = sum(h[0].nbytes + h[1].nbytes for h in hists.values())
        bins = max(len(h[0]) for h in hists.values())
    else:
        state = ptqkit_state_bytes(cal)
        counts = getattr(getattr(cal, "stats", None), "counts", None)
        bins = counts.shape[-1] if counts is not None else None
    return {"state": state, "py_peak": py_peak, "rss": max(peak - rss0, 0), "bins": bins}


def measure_ort_collector_growth(n_batches: int, size: int) -> int:
    """Bins of ORT's entropy histogram when fed batch by batch (its range grows by adding
    bins of the first batch's width)."""
    col = HistogramCollector("entropy", False, 4096, 256, 0, "same")
    with contextlib.redirect_stdout(io.StringIO()):
        for b in memory_batches(n_batches, size):
            col.collect({"t": [b]})
    return len(col.get_histogram_dict()["t"][0])


def measure_memory(which: str, n_batches: int, size: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--memory-child", which, str(n_batches), str(size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="100k values: check the script only")
    ap.add_argument("--out", default=str(Path(__file__).with_name("CALIBRATORS.md")))
    ap.add_argument("--memory-child", nargs=3, metavar=("WHICH", "BATCHES", "SIZE"),
                    help=argparse.SUPPRESS)  # fmt: skip
    args = ap.parse_args()
    if args.memory_child:
        which, nb, size = args.memory_child
        print(json.dumps(memory_child(which, int(nb), int(size))))
        return
    torch.set_num_threads(1)  # every method single-threaded, as ORT's numpy loops are
    n = 100_000 if args.quick else 1_000_000
    data = make_data(n)
    load0 = os.getloadavg()
    t_start = time.perf_counter()

    rows: list[dict] = []  # distribution, method, range, time, mse, note
    checks: dict[str, list] = {"kl_ms": [], "speedup_search": [], "speedup_full": [],
                               "same_t": [], "mse_vs_ort": []}  # fmt: skip
    for dname, x in data.items():
        print(f"== {dname}", flush=True)
        xt = torch.from_numpy(x)
        lo_obs, hi_obs = float(x.min()), float(x.max())
        batches = np.array_split(x, N_BATCHES)

        def add(method, lo, hi, secs, note="", dname=dname, xt=xt):
            mse = sample_mse(xt, lo, hi)
            rows.append({"d": dname, "m": method, "lo": lo, "hi": hi, "t": secs, "mse": mse,
                         "note": note})  # fmt: skip
            print(f"  {method:<42} [{lo:.5g}, {hi:.5g}]  {fmt_t(secs):>10}  mse={mse:.4g}")
            return mse

        def clip(t, lo_obs=lo_obs, hi_obs=hi_obs):
            return max(-t, lo_obs), min(t, hi_obs)

        # 1. the KL threshold search on one 2048-bin |x| histogram
        hist, w = abs_histogram(x)
        (cands, kl), t_vec, t_min = timed(
            lambda hist=hist: kl_divergence_curve(hist, KL_LEVELS), 50
        )
        i_vec = int(cands[int(np.argmin(kl))])
        add("ptqkit kl_divergence_curve (search only)", *clip(i_vec * w), t_vec,
            f"bin {i_vec} of {KL_BINS}; median of 50 (min {fmt_t(t_min)})")  # fmt: skip
        (i_loop, curve), t_loop, _ = timed(lambda hist=hist: kl_loop(hist, KL_LEVELS), 1)
        fin = np.isfinite(curve)
        dev = float(np.max(np.abs(kl[fin] - curve[fin]))) if fin.any() else 0.0
        same_inf = bool(np.array_equal(np.isinf(kl), np.isinf(curve)))
        tie = abs(kl[i_loop - KL_LEVELS] - kl[i_vec - KL_LEVELS])
        note = f"bin {i_loop}; curves differ by ≤ {dev:.1e}"
        if i_loop != i_vec:
            note += f"; KL(bin {i_loop}) - KL(bin {i_vec}) = {tie:.1e}: a tie"
        add("straightforward loop, same algorithm (search)", *clip(i_loop * w), t_loop, note)
        same = same_inf and dev < 1e-9 and (i_loop == i_vec or tie < 1e-12)
        checks["same_t"].append((dname, i_vec, i_loop, same))
        checks["kl_ms"].append((dname, t_vec, t_min))

        # the chapter's loop: timed per threshold on all values, run in full on a subsample
        sub = np.random.default_rng(SEED + 2).choice(x, min(NAIVE_SUBSAMPLE, n), replace=False)
        t_naive, _ = chapter_kl(sub)
        subset = list(np.linspace(1, KL_BINS - 2, NAIVE_SUBSET).round().astype(int))
        _, per_t = chapter_kl(x, thresholds=subset)
        add("chapter's naive KL loop (O(bins × N))", *sorted((-t_naive, t_naive)),
            per_t * (KL_BINS - 2),
            f"extrapolated: {fmt_t(per_t)}/threshold × {KL_BINS - 2}; threshold from a "
            f"full run on {len(sub):,} values")  # fmt: skip

        # 2. full calibrators: observe 10 batches + compute_range
        full = {}
        for name in ("kl", "mse", "percentile", "auto_percentile", "minmax"):

            def run(name=name, batches=batches):
                cal = make_calibrator(name)
                for b in batches:
                    cal.observe(torch.from_numpy(b))
                return cal, cal.compute_range(SPEC)

            (cal, (lo, hi)), secs, _ = timed(run, 3)
            note = "4096 bins" if name != "minmax" else ""
            if name == "auto_percentile":
                note += f", chose p={float(cal.chosen_percentile):g}"
            full[name] = (add(f"ptqkit {name} (observe + compute_range)", float(lo), float(hi),
                              secs, note), secs)  # fmt: skip

        # 3. ONNX Runtime
        (ort_lo, ort_hi, ort_search, bins), ort_total, _ = timed(
            lambda batches=batches: ort_collector("entropy", batches, **ORT_ENTROPY), 1
        )
        ort_mse = add("ORT entropy, 4096 bins / 256 quantized (collect + compute)", ort_lo,
                      ort_hi, ort_total, f"search alone {fmt_t(ort_search)}; the histogram "
                      f"grew to {bins} bins")  # fmt: skip
        (lo, hi, _, bins), total, _ = timed(
            lambda batches=batches: ort_collector("entropy", batches, **ORT_ENTROPY_DEFAULT), 1
        )
        ort_default_mse = add("ORT entropy, defaults 128 bins / 128 quantized", lo, hi, total,
                              f"{bins} bins: a single candidate window")  # fmt: skip
        (lo, hi, _, bins), total, _ = timed(
            lambda batches=batches: ort_collector("percentile", batches, **ORT_PERCENTILE), 1
        )
        add("ORT percentile 99.99, 2048 |x| bins", lo, hi, total, f"{bins} bins")
        checks["speedup_search"].append((dname, ort_search / t_vec))
        checks["speedup_full"].append((dname, ort_total / full["kl"][1]))
        checks["mse_vs_ort"].append((dname, full["kl"][0], ort_mse, ort_default_mse))

    print("== memory", flush=True)
    size = 4096
    mem = {}
    for nb in (10, 1000):
        for which in ("kl", "minmax", "ort-entropy"):
            mem[(which, nb)] = measure_memory(which, nb, size)
            print(f"  {which} {nb} batches: {mem[(which, nb)]}", flush=True)
        mem[("ORT collector bins", nb)] = measure_ort_collector_growth(nb, size)

    elapsed = time.perf_counter() - t_start
    write_report(Path(args.out), rows, checks, mem, size, n, load0, os.getloadavg(), elapsed,
                 args.quick)  # fmt: skip
    print(f"wrote {args.out} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
