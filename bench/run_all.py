"""ptqkit side by side with ONNX Runtime ``quantize_static``, PyTorch FX PTQ and NNCF on the same
models, calibration samples and evaluation sets, in one run; writes ``BENCHMARKS.md``.

    python bench/run_all.py            # full: 10k Fashion-MNIST test images, 1,000 photo crops
    python bench/run_all.py --quick    # validation run (< 5 min): 2k test images, 64 crops
    python bench/run_all.py --quick --models efficientnet_lite0 --rows "NNCF ONNX,empirical,tune"
                                       # only the rows whose label contains one of those
                                       # words (and the memory table only if "memory" is one)

Rows per model: ptqkit W8A8 with each calibrator (and the best one exported to ONNX Runtime),
minmax + CLE + bias correction, mse + empirical bias correction, the default ``PTQConfig()``
(mse + scale-and-bias correction), ``ptqkit.tune(model, calib, PTQConfig(), budget_s=120)`` (the
recipe search from the default; its chosen recipe is printed under the table), W4A8 AdaRound;
ONNX Runtime ``quantize_static`` (MinMax, Entropy, Percentile);
PyTorch FX; NNCF's torch backend with its defaults, and NNCF's ONNX backend with full bias
correction (``nncf.quantize(onnx_model, dataset, fast_bias_correction=False)``) on the same FP32
ONNX file as ONNX Runtime's rows, run by ONNX Runtime. Every ptqkit row uses per-channel weights
(the ``PTQConfig`` default). ``--quick`` skips some rows; ``--rows`` runs exactly the rows it
names, ``--quick`` or not.

NNCF is not a project dependency: ``pip install nncf`` (3.4.0 adds only ninja, openvino-telemetry,
psutil, pydot, tabulate), or ``pip install --no-deps --target DIR nncf`` plus those five, found
through ``PTQKIT_NNCF_PATH=DIR``. Without it (or ``--no-nncf``), or when a tool fails, its rows
say so and why.

Every tool's calibration + quantization runs in its own fresh process (``--worker``), so its
wall time and peak resident memory are its own: the kernel's peak-RSS mark is reset after the
model and data are loaded and one warm-up batch has run, and read after the tool returns. ONNX
variants (ptqkit's export, ONNX Runtime's quantizer) are timed in this process, interleaved so a
load spike hits every variant alike; FX's int8 model is timed in its worker (eager PyTorch).
Worker: ``jobs.py``; peers' calls: ``peers.py``; the page: ``benchmarks_md.py``. Not in pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

#: the environment this script was started in: what the timed rows' processes get (see run_job)
CALLER_ENV = dict(os.environ)
if "--worker" not in sys.argv:  # the parent's ONNX latencies only, never a timed worker (it
    # once ran in every worker: W4A8 AdaRound on MobileNetV2-style 14.1 s instead of 10.9 s)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_export import export_fp32, latency, task  # noqa: E402
from bench_pipeline import PROBE_ENV  # noqa: E402
from benchmarks_md import report  # noqa: E402
from jobs import THREADS, quality, scores, worker  # noqa: E402

from ptqkit.export import OrtModule  # noqa: E402

MODELS = ("resnet_fmnist", "mobilenetv2_fmnist", "efficientnet_lite0")
PTQ_CALIBRATORS = ("minmax", "percentile", "kl", "mse", "auto_percentile")
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
TUNE_BUDGET_S = 120.0


# -- one row in a fresh process (the worker: jobs.py) ------------------------------------------


def run_job(job: dict, timeout: float, memory: bool = False) -> dict:
    """``job`` in a fresh process: its result, or ``{"error": why}``. Rows run in the caller's
    environment (:data:`CALLER_ENV`, what a user's process gets): no ``OMP_WAIT_POLICY=PASSIVE``
    (W4A8 AdaRound on MobileNetV2-style: 20.3 s with it, 15.5 s without) and no fixed mmap
    threshold; only the memory-flatness rows (``memory``) get :data:`PROBE_ENV`'s, which makes
    RSS follow live memory but every allocation of 128 KiB or more a fresh ``mmap`` (the same
    AdaRound: 24 s → 73 s)."""
    env = (
        {**CALLER_ENV, "MALLOC_MMAP_THRESHOLD_": PROBE_ENV["MALLOC_MMAP_THRESHOLD_"]}
        if memory
        else CALLER_ENV
    )
    cmd = [sys.executable, __file__, "--worker", json.dumps(job)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"not run: over its {timeout:.0f} s budget"}
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()] or ["?"]
        errs = [ln for ln in lines if ln[:1] != " " and ("Error" in ln or "Exception" in ln)]
        return {"error": f"failed: {(errs or lines)[-1][:200]}"}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    log(
        f"  {job['tool']} {job.get('calibrator') or job.get('method') or job.get('kind') or ''}"
        f" {job.get('label', '')}: {out.get('metric', 0):.2f} in "
        f"{time.perf_counter() - t0:.0f} s",
    )
    return out


# -- one model ---------------------------------------------------------------------------------
def bench_model(name: str, args, out: Path) -> dict:
    effnet = name == "efficientnet_lite0"
    n_calib = 128 if effnet else 512
    # 1,000 crops: one crop is 0.1 point of agreement, the resolution of the default-config
    # target (at 256, one crop was 0.39 points)
    n_eval = (64 if args.quick else 1000) if effnet else (2000 if args.quick else 10_000)
    model, _, x_eval, y_eval = task(name, n_calib, n_eval)
    ref = scores(model, x_eval, 32 if effnet else 500)
    torch.save(ref, out / f"{name}.ref.pt")
    fp32_onnx = export_fp32(model, out / f"{name}.fp32.onnx", x_eval[:1])
    fp32 = quality(ref, ref, y_eval)
    base = {"model": name, "n_calib": n_calib, "n_eval": n_eval, "ref": str(out / f"{name}.ref.pt")}
    tmo = args.timeout if not effnet else min(args.timeout, 420)
    quick_skip = "not run (--quick)"
    rows: list[dict] = []

    def add(
        label: str, tool: str, runtime: str, job: dict, timeout: float = tmo, quick: bool = True
    ) -> dict:
        """Run the row, or record why not: ``--rows`` names exactly the rows to run; otherwise
        ``--quick`` skips the rows with ``quick=False``."""
        r = {"label": label, "tool": tool, "runtime": runtime, **job}
        if args.rows:
            why = None if any(w in label.lower() for w in args.rows) else "not run (--rows)"
        else:
            why = quick_skip if args.quick and not quick else None
        if why:
            rows.append({**r, "error": why})
            return rows[-1]
        log(f"[{name}] {label}")
        r.update(run_job({**base, "tool": tool, **job}, timeout))
        rows.append(r)
        return r

    for cal in PTQ_CALIBRATORS:
        onnx = str(out / f"{name}.ptqkit_{cal}.onnx")
        add(
            f"ptqkit W8A8 {cal}",
            "ptqkit",
            "simulated (PyTorch)",
            {"calibrator": cal, "onnx": onnx},
            quick=cal in ("minmax", "kl"),
        )
    ok = [r for r in rows if "error" not in r]
    if ok:  # the best calibrator (top-1, or agreement then KL), deployed in ONNX Runtime
        best = min(ok, key=lambda r: 100 - r["metric"] + (0 if y_eval is not None else r["kl"]))
        ort = OrtModule(best["onnx"], threads=THREADS, spinning=False)
        exp = {
            "label": f"ptqkit W8A8 {best['calibrator']} → ONNX",
            "tool": "ptqkit",
            "runtime": "ONNX Runtime (int8)",
            "calibrator": best["calibrator"],
            "onnx": best["onnx"],
            "seconds": best["seconds"],
            "peak_mib": best["peak_mib"],
            "size": best["onnx_size"],
            "export_of_best": True,
        }
        exp.update(quality(scores(ort, x_eval, 32 if effnet else 500), ref, y_eval))
        rows.append(exp)
    add(
        "ptqkit W8A8 minmax + CLE + bias corr.",
        "ptqkit",
        "simulated (PyTorch)",
        {"calibrator": "minmax", "cle": True},
    )
    add(
        "ptqkit W8A8 mse + empirical bias corr.",
        "ptqkit",
        "simulated (PyTorch)",
        {"calibrator": "mse", "bias_correction": "empirical"},
    )
    add(
        "ptqkit W8A8 default PTQConfig() (mse + scale-and-bias corr.)",
        "ptqkit",
        "simulated (PyTorch)",
        {"calibrator": "mse", "bias_correction": "affine"},
    )
    add(
        f"ptqkit W8A8 tune (budget {TUNE_BUDGET_S:.0f} s)",
        "ptqkit",
        "simulated (PyTorch)",
        {"calibrator": "mse", "bias_correction": "auto", "tune": TUNE_BUDGET_S},
        timeout=max(tmo, 3 * TUNE_BUDGET_S),  # over budget shows in its time, not as a kill
        quick=False,
    )
    if effnet and args.no_effnet_adaround:
        why = "not run (time budget of this run)"
        rows.append({"label": "ptqkit W4A8 AdaRound", "tool": "ptqkit", "error": why})
    else:
        iters = 100 if args.quick else 500
        add(
            f"ptqkit W4A8 minmax + AdaRound ({iters} it/layer)",
            "ptqkit",
            "simulated (PyTorch)",
            {"calibrator": "minmax", "w4": True, "adaround": True, "adaround_iters": iters},
            timeout=args.adaround_timeout,
            quick=not effnet,
        )
        # what PTQConfig(weights=W4, adaround=True) gives: mse activation ranges, AdaRound, then
        # scale-and-bias correction; three seeds (AdaRound's row sampling and mini-batches),
        # since one seed's drop differs from another's by ~0.1 point on 10,000 images; then block
        # reconstruction (BRECQ) instead of layer-wise, same step count
        w4 = {"calibrator": "mse", "bias_correction": "auto", "w4": True, "adaround": True}
        runs = [(f"({iters} it/layer), seed {k}", {"seed": k}) for k in (0, 1, 2)]
        runs.append((f"block-wise (BRECQ, {iters} it/block), seed 0", {"granularity": "block"}))
        for what, extra in runs:
            add(
                f"ptqkit W4A8 default + AdaRound {what}",
                "ptqkit",
                "simulated (PyTorch)",
                {**w4, "adaround_iters": iters, **extra},
                timeout=args.adaround_timeout,
                quick=False,
            )
    for m in ORT_METHODS:
        add(
            f"ORT quantize_static QDQ {m}",
            "ort",
            "ONNX Runtime (int8)",
            {
                "method": m,
                "fp32_onnx": str(fp32_onnx),
                "onnx": str(out / f"{name}.ort_{m}.onnx"),
                "mem_limit_gib": args.mem_limit,
            },
            quick=m != "Percentile",
        )
    add(  # ONNX Runtime's remedy for its u8s8 saturation on AVX2 CPUs without VNNI
        "ORT quantize_static QDQ MinMax reduce_range",
        "ort",
        "ONNX Runtime (int8)",
        {
            "method": "MinMax",
            "reduce_range": True,
            "fp32_onnx": str(fp32_onnx),
            "onnx": str(out / f"{name}.ort_MinMax_rr.onnx"),
            "mem_limit_gib": args.mem_limit,
        },
    )
    fx_job = {"rounds": args.rounds, "budget": args.budget}
    # FX's eager int8 EfficientNet-Lite0: ~13 s per batch of 32, ~7 min for 1,000 eval crops
    fx_tmo = args.timeout if effnet else tmo
    add(
        "PyTorch FX default x86 qconfig",
        "fx",
        "PyTorch eager (int8)",
        {"kind": "default", **fx_job},
        timeout=fx_tmo,
    )
    add(
        "PyTorch FX minmax (timing ref.)",
        "fx",
        "PyTorch eager (int8)",
        {"kind": "minmax", **fx_job},
        timeout=fx_tmo,
    )
    if args.nncf:
        add(
            "NNCF nncf.quantize (defaults)",
            "nncf",
            "simulated (PyTorch)",
            {},
            timeout=300,
            quick=False,
        )
        add(
            "NNCF ONNX nncf.quantize (full bias corr.)",
            "nncf_onnx",
            "ONNX Runtime (int8)",
            {"fp32_onnx": str(fp32_onnx), "onnx": str(out / f"{name}.nncf_onnx.onnx")},
            # its full bias correction runs an ONNX subgraph per layer (50 on EfficientNet-Lite0):
            # 130-150 s there, on the shared 2-core machine under load
            timeout=600 if args.quick else 900,
        )
    else:
        for label in ("NNCF nncf.quantize (defaults)", "NNCF ONNX nncf.quantize (full bias corr.)"):
            rows.append({"label": label, "tool": "nncf", "error": "not run (--no-nncf)"})
    for r in rows:
        if "metric" in r:
            r["drop"] = fp32["metric"] - r["metric"]

    # latency of every ONNX variant, interleaved
    variants = {"FP32 (ORT)": OrtModule(fp32_onnx, threads=THREADS, spinning=False)}
    for r in rows:
        if "error" not in r and r["runtime"].startswith("ONNX"):
            variants[r["label"]] = OrtModule(r["onnx"], threads=THREADS, spinning=False)
    lat = {}
    for b in (1, 32):
        x = x_eval[:b] if len(x_eval) >= b else x_eval.repeat(b, 1, 1, 1)[:b]
        budget = args.budget * (0.5 if effnet and b == 32 else 1.0)
        lat[str(b)] = latency(variants, x.contiguous(), args.rounds, budget)
    for r in rows:
        if r.get("label") in variants:
            r["latency"] = {b: lat[b][r["label"]] for b in lat}
    fp32["latency"] = {b: lat[b]["FP32 (ORT)"] for b in lat}
    fp32["size"] = Path(fp32_onnx).stat().st_size
    return {"model": name, "n_calib": n_calib, "n_eval": n_eval, "fp32": fp32, "rows": rows}


def bench_memory(args, out: Path) -> list[dict]:
    """Calibration peak RSS for 256 vs 2,048 samples: ptqkit (kl, histogram) vs ORT Entropy."""
    name = "resnet_fmnist"
    model, _, x_eval, _ = task(name, 8, 8)
    fp32_onnx = export_fp32(model, out / f"{name}.mem.fp32.onnx", x_eval[:1])
    res = []
    for n in (256, 2048):
        base = {"model": name, "n_calib": n, "n_eval": 8, "ref": None}
        for tool, job in (
            ("ptqkit", {"calibrator": "kl"}),
            (
                "ort",
                {
                    "method": "Entropy",
                    "fp32_onnx": str(fp32_onnx),
                    "onnx": str(out / f"{name}.mem_{n}.onnx"),
                    "mem_limit_gib": args.mem_limit,
                },
            ),
        ):
            log(f"[memory] {tool} {n} samples")
            r = run_job({**base, "tool": tool, **job}, args.timeout, memory=True)
            res.append({"tool": tool, "samples": n, **r})
    return res


# -- output --------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write(args, models: list[dict], mem: list[dict], out: Path, t0: float, partial=False) -> None:
    ran = [m for m in models if "skipped" not in m]
    cmd = ("python bench/run_all.py " + " ".join(sys.argv[1:])).strip()
    text = report(args, ran, mem, cmd, time.perf_counter() - t0)
    skipped = "".join(f"## {m['model']}\n\n{m['skipped']}\n\n" for m in models if "skipped" in m)
    text = text.replace("## all-MiniLM", skipped + "## all-MiniLM")
    if partial:
        text = text.replace("\n\n", "\n\n> **PARTIAL**: the run was still going.\n\n", 1)
    Path(args.out).write_text(text)
    js = ROOT / "bench" / "out" / ("run_all_quick.json" if args.quick else "run_all.json")
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps({"models": models, "memory": mem, "work_dir": str(out)}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="validation run, < 5 min")
    ap.add_argument("--models", default="", help="default: all (--quick: resnet_fmnist)")
    ap.add_argument("--no-nncf", dest="nncf", action="store_false")
    ap.add_argument(
        "--rows",
        default="",
        help="comma-separated words: run only the rows whose label contains one (any case)",
    )
    ap.add_argument("--no-effnet-adaround", action="store_true", help="skip a slow row")
    ap.add_argument("--mem-limit", type=float, default=12.0, help="GiB address space per worker")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.rows = [w.strip().lower() for w in args.rows.split(",") if w.strip()]
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    args.rounds, args.budget = (2, 0.3) if args.quick else (3, 1.0)
    args.timeout = 240 if args.quick else 900
    args.adaround_timeout = 120 if args.quick else 900
    torch.set_num_threads(THREADS)
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    # the ONNX files and references live in a private folder: bench/out is shared with other
    # benchmarks, which may recreate it while this one runs
    out = Path(tempfile.mkdtemp(prefix="ptqkit_run_all_"))
    from ptqkit.zoo import train as zoo_train

    models = []
    names = args.models or ("resnet_fmnist" if args.quick else ",".join(MODELS))
    # first: cheap, and its target must not be lost if a long model run is stopped
    run_mem = "resnet_fmnist" in names and (not args.rows or "memory" in args.rows)
    mem = bench_memory(args, out) if run_mem else []
    for name in names.split(","):
        if args.quick and name in zoo_train.RECIPES and zoo_train.cached_info(name) is None:
            log(f"[{name}] not cached: skipped in --quick (training takes 10+ min)")
            models.append({"model": name, "skipped": "not run (--quick, model not trained yet)"})
            continue
        models.append(bench_model(name, args, out))
        write(args, models, mem, out, t0, partial=True)  # keep what ran if stopped later
    write(args, models, mem, out, t0)
    log(f"wrote {args.out} in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
