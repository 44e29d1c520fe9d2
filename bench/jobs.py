"""One benchmark row in a fresh process (``run_all.py --worker JOB``): the tool's calibration and
quantization timed, with its peak memory, then its model scored on the evaluation set."""

from __future__ import annotations

import io
import resource
import time
import warnings
from pathlib import Path

import torch
from bench_export import latency, ort_quantize, task
from memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from peers import fx_quantize, import_nncf, nncf_onnx_quantize, nncf_quantize

import ptqkit
from ptqkit.export import OrtModule

THREADS = 2
MIB = 2**20


def scores(fn, x: torch.Tensor, bs: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([torch.as_tensor(fn(x[i : i + bs])).float() for i in range(0, len(x), bs)])


def quality(out: torch.Tensor, ref: torch.Tensor, y: torch.Tensor | None) -> dict:
    """Top-1 vs labels (Fashion-MNIST), or top-1 agreement and mean KL(FP32 ‖ int8) vs FP32."""
    agree = 100.0 * float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    lp, lq = ref.log_softmax(-1), out.log_softmax(-1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    metric = agree if y is None else 100.0 * float((out.argmax(-1) == y).float().mean())
    return {"metric": metric, "agreement": agree, "kl": kl}


def measured(fn) -> tuple[object, float, float]:
    """``fn()``, its wall seconds and its peak RSS above the RSS before it (MiB)."""
    import gc

    gc.collect()
    exact = reset_peak_rss()
    base = rss_bytes()
    t0 = time.perf_counter()
    result = fn()
    sec = time.perf_counter() - t0
    peak = max(rss_bytes(), peak_rss_bytes() if exact else 0)
    return result, sec, (peak - base) / MIB


def ptq_config(job: dict) -> ptqkit.PTQConfig:
    kw = {
        "calibration": job.get("calibrator", "minmax"),
        "progress": False,
        "seed": job.get("seed", 0),
    }
    # explicit: PTQConfig()'s default is bias_correction="auto" since issue 14; a row without it
    # is the calibrator alone
    kw["bias_correction"] = job.get("bias_correction", False)
    if job.get("cle"):
        kw.update(cle=True, bias_correction=True)
    if job.get("w4"):
        kw["weights"] = ptqkit.QuantSpec(bits=4, symmetric=True, per_channel=True)
    if job.get("adaround"):
        kw.update(adaround=True, adaround_iters=job.get("adaround_iters", 500))
        if job.get("granularity"):
            kw["adaround_options"] = {"granularity": job["granularity"]}
    return ptqkit.PTQConfig(**kw)


def worker(job: dict) -> dict:
    torch.set_num_threads(THREADS)
    warnings.simplefilter("ignore")
    if job.get("mem_limit_gib"):  # fail with MemoryError instead of starving the shared machine
        lim = int(job["mem_limit_gib"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    model, calib, x_eval, y_eval = task(job["model"], job["n_calib"], job["n_eval"])
    ref = torch.load(job["ref"]) if job.get("ref") else None
    bs = 32 if job["model"] == "efficientnet_lite0" else 500
    with torch.no_grad():
        model(calib[0])  # warm the allocator and kernels before the memory baseline
    tool, res = job["tool"], {}
    if tool == "ptqkit" and job.get("tune"):
        q, sec, peak = measured(
            lambda: ptqkit.tune(model, calib, ptq_config(job), budget_s=job["tune"])
        )
        res["note"] = q.ptq_info.recipe
    elif tool == "ptqkit":
        q, sec, peak = measured(lambda: ptqkit.quantize(model, calib, ptq_config(job)))
    if tool == "ptqkit":
        res["size"] = ptqkit.evaluate(model, q, [(x_eval[:8], None)], "agreement", False)
        res["size"] = res["size"].size_bytes_quantized
        if ref is not None:
            res.update(quality(scores(q, x_eval, bs), ref, y_eval))
        if job.get("onnx"):
            ptqkit.export_onnx(q, job["onnx"], x_eval[:1])
            res["onnx_size"] = Path(job["onnx"]).stat().st_size
    elif tool == "ort":
        _, sec, peak = measured(
            lambda: ort_quantize(
                Path(job["fp32_onnx"]),
                Path(job["onnx"]),
                calib,
                job["method"],
                job.get("reduce_range", False),
            )
        )
        ort = OrtModule(job["onnx"], threads=THREADS, spinning=False)
        if ref is not None:
            res.update(quality(scores(ort, x_eval, bs), ref, y_eval))
        res["size"] = Path(job["onnx"]).stat().st_size
    elif tool == "fx":
        q, sec, peak = measured(lambda: fx_quantize(model, calib, job["kind"]))
        res.update(quality(scores(q, x_eval, bs), ref, y_eval))
        buf = io.BytesIO()
        torch.save(q.state_dict(), buf)
        res["size"] = buf.tell()
        lat = {}
        for b in (1, 32):
            x = x_eval[:b] if len(x_eval) >= b else x_eval.repeat(b, 1, 1, 1)[:b]
            lat[str(b)] = latency({"fx": q}, x.contiguous(), job["rounds"], job["budget"])["fx"]
        res["latency"] = lat
    elif tool == "nncf":
        q, sec, peak = measured(lambda: nncf_quantize(model, calib))
        res.update(quality(scores(q, x_eval, bs), ref, y_eval))
    elif tool == "nncf_onnx":
        import_nncf()  # not timed: importing NNCF (seconds) is not calibration
        _, sec, peak = measured(
            lambda: nncf_onnx_quantize(Path(job["fp32_onnx"]), Path(job["onnx"]), calib)
        )
        ort = OrtModule(job["onnx"], threads=THREADS, spinning=False)
        res.update(quality(scores(ort, x_eval, bs), ref, y_eval))
        res["size"] = Path(job["onnx"]).stat().st_size
    else:
        raise ValueError(tool)
    res.update(seconds=sec, peak_mib=peak)
    return res
