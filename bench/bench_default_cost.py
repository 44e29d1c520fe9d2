"""EfficientNet-Lite0: what the default ``ptqkit.quantize(model, batches)`` costs, in FP32 passes.

The ratio ``quantize time / one FP32 eager pass`` over the same calibration batches (128 crops of
the photos bundled with scikit-image, 4 batches of 32, 2 threads), both measured in this process
(medians), so that a loaded machine scales both alike; issue 27's goal is <= 2.0. Then where the
time goes: the stages ptqkit records (``ptq_info.stages``) and a finer split timed by wrapping
the functions each stage calls (capture check forwards, the calibration data pass, the
histogram updates, the outlier watch, the range solve, bias correction's propagation, check and
float-means tap, the quantizers' fake-quant). ``--profile cprofile`` / ``--profile torch`` add
a cProfile (by cumulative time) / ``torch.profiler`` (by operator) table of one more run.
Accuracy: top-1 agreement and KL with FP32 on other crops (seed 1). Writes
``bench/DEFAULT_COST.md``.

    python bench/bench_default_cost.py [--quick] [--eval 1000] [--repeats 3] [--profile cprofile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import platform
import pstats
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_onepass import batches, logits, score

import ptqkit
from ptqkit import PTQConfig
from ptqkit.zoo import pretrained
from ptqkit.zoo.data import photo_crops

#: (label, module, attribute): what the breakdown times, inclusive of what each calls
TIMED: list[tuple[str, str, str]] = [
    ("capture: reference forward (model, batch 0)", "ptqkit.capture.prepare", "run_reference"),
    ("capture: check forward(s) (copy, batch 0)", "ptqkit.capture.prepare", "check_capture"),
    ("capture: fx trace", "ptqkit.capture.prepare", "trace"),
    ("capture: state hold/restore", "ptqkit.capture.state", "StateRestore.restore"),
    ("calibrate: data pass (forward + observers)", "ptqkit.calibrate.session", "observe"),
    ("calibrate: outlier watch (incl. histogram)", "ptqkit.calibrate.watch", "Watch.observe"),
    ("calibrate: histogram updates", "ptqkit.calibrate.stats", "HistogramStats.update"),
    ("calibrate: float-means tap (bias correction)", "ptqkit.correct.means", "Mean.add"),
    ("calibrate: affine rows tap", "ptqkit.correct.means", "FloatMeans._pick"),
    ("calibrate: range solve", "ptqkit.calibrate.session", "set_ranges"),
    ("weights: range search", "ptqkit.calibrate.weights", "quantize_weights"),
    ("bias: quantized propagation (all)", "ptqkit.correct.bias", "propagate"),
    ("bias: layer order", "ptqkit.correct.bias", "layer_order"),
    ("bias: pairs for the scale fit", "ptqkit.correct.bias", "pair"),
    ("bias: correction check", "ptqkit.correct.bias", "check"),
    ("fake-quant (activations, all stages)", "ptqkit.quant.modules", "fake_quant"),
]


@contextlib.contextmanager
def breakdown() -> Iterator[dict[str, float]]:
    """Wrap every :data:`TIMED` function with a timer (recursive calls counted once)."""
    import importlib

    acc: dict[str, float] = {label: 0.0 for label, _, _ in TIMED}
    undo: list[tuple[Any, str, Any]] = []
    for label, mod_name, attr in TIMED:
        owner: Any = importlib.import_module(mod_name)
        *path, name = attr.split(".")
        for p in path:
            owner = getattr(owner, p)
        fn = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        depth = [0]

        def wrapped(*a: Any, _fn: Any = fn, _l: str = label, _d: list = depth, **k: Any) -> Any:
            _d[0] += 1
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                _d[0] -= 1
                if _d[0] == 0:
                    acc[_l] += time.perf_counter() - t0

        setattr(owner, name, wrapped)
        undo.append((owner, name, fn))
    try:
        yield acc
    finally:
        for owner, name, fn in reversed(undo):
            setattr(owner, name, fn)


def fp32_pass(model: torch.nn.Module, calib: list[torch.Tensor], repeats: int) -> list[float]:
    """Wall times of plain eager float inference over ``calib`` (after one warm-up batch)."""
    out = []
    with torch.no_grad():
        model(calib[0])
        for _ in range(repeats):
            t0 = time.perf_counter()
            for b in calib:
                model(b)
            out.append(time.perf_counter() - t0)
    return out


def quantize_once(model: torch.nn.Module, calib: list[torch.Tensor]) -> tuple[Any, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        q = ptqkit.quantize(model, calib, PTQConfig(progress=False))
        return q, time.perf_counter() - t0


def profiled(model: torch.nn.Module, calib: list[torch.Tensor], kind: str, top: int) -> str:
    """One more default quantize under cProfile or torch.profiler: the top rows as text."""
    if kind == "cprofile":
        prof = cProfile.Profile()
        prof.enable()
        quantize_once(model, calib)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
        return buf.getvalue()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        quantize_once(model, calib)
    return str(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    model = pretrained("efficientnet_lite0").eval()
    calib = batches(photo_crops(args.calib, seed=0), args.batch)
    x_eval = photo_crops(args.eval, seed=1)
    ref = logits(model, x_eval)
    fp32, quant, stages, parts, q = [], [], [], [], None
    for r in range(args.repeats):  # interleaved: a load change hits both sides alike
        fp32 += fp32_pass(model, calib, 1 if r else 2)
        with breakdown() as acc:
            q, t = quantize_once(model, calib)
        quant.append(t)
        stages.append(dict(q.ptq_info.stages))
        parts.append(dict(acc))
        print(f"run {r}: fp32 {fp32[-1]:.2f} s, quantize {t:.2f} s", flush=True)
    assert q is not None
    out: dict[str, Any] = {
        "load0": load0,
        "fp32": fp32,
        "quant": quant,
        "stages": {k: statistics.median(s.get(k, 0.0) for s in stages) for k in stages[-1]},
        "parts": {k: statistics.median(p[k] for p in parts) for k in parts[-1]},
        "score": score(ref, logits(q, x_eval)),
        "bias": q.ptq_info.details.get("bias_correction", {}),
        "capture": q.ptq_info.capture,
    }
    if args.profile:
        out["profile"] = profiled(model, calib, args.profile, args.top)
    out["load1"] = os.getloadavg()[0]
    return out


def report(args: argparse.Namespace, res: dict[str, Any]) -> list[str]:
    f, qt = statistics.median(res["fp32"]), statistics.median(res["quant"])
    cmd = "python bench/bench_default_cost.py " + " ".join(sys.argv[1:])
    bias = res["bias"]
    rejected = len(bias.get("rejected", {}))
    lines = [
        "# EfficientNet-Lite0: the cost of the default `quantize`, in FP32 passes",
        "",
        f"Generated by `{cmd.strip()}` (do not edit by hand).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads; load average {res['load0']:.2f} at start, "
        f"{res['load1']:.2f} at end (other processes slow both sides alike: the ratio is the "
        "number; the seconds are this run's).",
        "",
        f"Calibration data: {args.calib} crops (seed 0) in batches of {args.batch}; accuracy: "
        f"top-1 agreement / KL with FP32 on {args.eval} other crops (seed 1).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| one FP32 eager pass (median of {len(res['fp32'])}) | {f:.2f} s "
        f"({', '.join(f'{t:.2f}' for t in res['fp32'])}) |",
        f"| default `quantize` (median of {len(res['quant'])}) | {qt:.2f} s "
        f"({', '.join(f'{t:.2f}' for t in res['quant'])}) |",
        f"| **ratio** | **{qt / f:.2f} FP32 passes** (goal <= 2.0) |",
        f"| agreement with FP32 | {res['score']['agreement']:.2f} % (KL "
        f"{res['score']['kl']:.4f}) |",
        f"| capture / bias correction | {res['capture']}, {bias.get('mode')} "
        f"({len(bias.get('corrected', {}))} layers corrected, {rejected} rejected by the "
        "check) |",
        "",
        "Stages (`ptq_info.stages`, median seconds, and in FP32 passes):",
        "",
        "| stage | s | passes |",
        "|---|---|---|",
    ]
    for k, v in res["stages"].items():
        lines.append(f"| {k} | {v:.2f} | {v / f:.2f} |")
    lines += [
        "",
        "Finer (median seconds inside the timed functions, each inclusive of what it calls):",
        "",
        "| part | s | passes |",
        "|---|---|---|",
    ]
    for k, v in res["parts"].items():
        lines.append(f"| {k} | {v:.2f} | {v / f:.2f} |")
    if "profile" in res:
        lines += ["", f"`--profile {args.profile}` (one more run):", "", "```", res["profile"]]
        lines += ["```"]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 repeats, 200 held-out crops")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", choices=("cprofile", "torch"), default=None)
    ap.add_argument("--top", type=int, default=40, help="rows of the profile table")
    ap.add_argument("--out", default=str(Path(__file__).with_name("DEFAULT_COST.md")))
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.eval = min(args.repeats, 2), min(args.eval, 200)
    lines = report(args, run(args))
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
