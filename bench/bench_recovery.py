"""Accuracy recovery benchmark: cross-layer equalization, bias correction, AdaRound, automatic
fallback; writes ``bench/RECOVERY.md`` (and the raw results to ``bench/out/recovery.json``).

* CLE (+ bias correction) with **per-tensor** W8A8 (weights symmetric per-tensor, activations
  asymmetric per-tensor min/max): the zoo's MobileNetV2-style Fashion-MNIST model (top-1 on the
  test images; also per-tensor W4A8, where that small model does lose) and EfficientNet-Lite0
  (ImageNet weights; no ImageNet images here, so top-1 *agreement* with the FP32 model on random
  crops of the photos bundled with scikit-image, calibrated on other crops). Per-channel W8A8 is
  listed for reference.
* AdaRound vs nearest rounding with W4A8 (4-bit per-channel weights) on the ResNet-style
  Fashion-MNIST model.
* Automatic fallback with a 0.5-point target on a configuration that misses it (ResNet-style,
  W4A8 nearest rounding): what it keeps in float, the drop on the calibration data it measures
  on and on the test set.
* The time of each algorithm (``qmodel.ptq_info.stages``).

Full run (a quiet machine; trains the Fashion-MNIST models first if they are not cached):

    python bench/bench_recovery.py

Quick validation (small subsets, fewer AdaRound iterations; numbers are not the reported ones):

    python bench/bench_recovery.py --quick --threads 1 --out /tmp/RECOVERY.quick.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ptqkit
from ptqkit import PTQConfig, QuantSpec
from ptqkit.zoo import pretrained
from ptqkit.zoo.data import fashion_mnist, photo_crops

PER_TENSOR = QuantSpec(bits=8, symmetric=True, per_channel=False)
PER_CHANNEL = QuantSpec(bits=8, symmetric=True, per_channel=True)
PER_TENSOR_W4 = QuantSpec(bits=4, symmetric=True, per_channel=False)
W4 = QuantSpec(bits=4, symmetric=True, per_channel=True)
A8 = QuantSpec(bits=8, symmetric=False)


# -- data and scoring ------------------------------------------------------------------------------
class Scorer:
    """FP32 logits computed once; each quantized model is scored against them (top-1 with
    labels, top-1 agreement, mean KL of the softmax outputs)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, bs: int) -> None:
        self.x, self.y, self.bs = x, y, bs
        t0 = time.perf_counter()
        self.ref = self._logits(model)
        self.fp32_s = time.perf_counter() - t0
        self.fp32 = self._top1(self.ref) if y is not None else 100.0

    def _logits(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [model(self.x[i : i + self.bs]) for i in range(0, len(self.x), self.bs)]
            )

    def _top1(self, logits: torch.Tensor) -> float:
        return 100.0 * float((logits.argmax(1) == self.y).float().mean())

    def __call__(self, qmodel: nn.Module) -> dict[str, float]:
        out = self._logits(qmodel)
        agree = 100.0 * float((out.argmax(1) == self.ref.argmax(1)).float().mean())
        p = torch.log_softmax(self.ref.double(), 1)
        kl = float((p.exp() * (p - torch.log_softmax(out.double(), 1))).sum(1).mean())
        res = {"agreement": agree, "kl": kl}
        if self.y is not None:
            res["top1"] = self._top1(out)
            res["drop"] = self.fp32 - res["top1"]
        else:
            res["drop"] = 100.0 - agree
        return res


def fmnist(quick: bool, n_calib: int, seed: int = 0) -> tuple[list, torch.Tensor, torch.Tensor]:
    """Labeled calibration batches (a seeded subset of the training images) and the test set."""
    x, y = fashion_mnist("train")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n_calib]
    calib = [(x[idx[i : i + 128]], y[idx[i : i + 128]]) for i in range(0, n_calib, 128)]
    xt, yt = fashion_mnist("test")
    n_test = 2000 if quick else len(xt)
    return calib, xt[:n_test], yt[:n_test]


def run(
    name: str, model: nn.Module, calib: list, cfg: PTQConfig, score: Callable
) -> dict[str, Any]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        q = ptqkit.quantize(model, calib, cfg)
        total = time.perf_counter() - t0
    row = {"config": name, **score(q), "quantize_s": total}
    row["stages_s"] = {k: round(v, 2) for k, v in q.ptq_info.stages.items()}
    row["warnings"] = sorted({str(w.message)[:160] for w in caught})
    row["qmodel"] = q
    print(f"  {name:<38} {fmt_metrics(row)}  ({total:.1f} s)", flush=True)
    return row


def fmt_metrics(r: dict[str, Any]) -> str:
    s = f"top-1 {r['top1']:.2f}%  " if "top1" in r else ""
    return s + f"agreement {r['agreement']:.2f}%  drop {r['drop']:+.2f}"


# -- sections ------------------------------------------------------------------------------------
def cle_configs(weights: QuantSpec = PER_TENSOR) -> list[tuple[str, PTQConfig]]:
    base = PTQConfig(
        weights=weights, activations=A8, calibration="minmax", bias_correction=False, progress=False
    )
    w = f"W{weights.bits}A8"
    return [
        (f"per-tensor {w}", base),
        ("+ bias correction (empirical)", base.replace(bias_correction="empirical")),
        ("+ CLE", base.replace(cle=True)),
        ("+ CLE + bias correction (analytic)", base.replace(cle=True, bias_correction="analytic")),
        (
            "+ CLE + bias correction (empirical)",
            base.replace(cle=True, bias_correction="empirical"),
        ),
        (
            f"per-channel {w} (reference)",
            base.replace(weights=QuantSpec(bits=weights.bits, per_channel=True)),
        ),
    ]


def section_cle_fmnist(args: argparse.Namespace) -> dict[str, Any]:
    print("CLE: mobilenetv2_fmnist, per-tensor W8A8", flush=True)
    model = pretrained("mobilenetv2_fmnist")
    calib, xt, yt = fmnist(args.quick, 256 if args.quick else 1024)
    score = Scorer(model, xt, yt, 500)
    rows = [run(n, model, calib, c, score) for n, c in cle_configs()]
    print("CLE: mobilenetv2_fmnist, per-tensor W4A8 (where per-tensor weights do lose)")
    rows4 = [run(n, model, calib, c, score) for n, c in cle_configs(PER_TENSOR_W4)]
    return {
        "model": "mobilenetv2_fmnist",
        "fp32": score.fp32,
        "samples": len(xt),
        "rows": rows,
        "rows_w4": rows4,
    }


def section_cle_effnet(args: argparse.Namespace) -> dict[str, Any]:
    print("CLE: efficientnet_lite0, per-tensor W8A8 (agreement with FP32)", flush=True)
    model = pretrained("efficientnet_lite0")
    n_cal, n_eval = (32, 64) if args.quick else (256, 500)
    xc = photo_crops(n_cal, seed=0)
    calib = [xc[i : i + 32] for i in range(0, n_cal, 32)]
    score = Scorer(model, photo_crops(n_eval, seed=1), None, 50)
    rows = [run(n, model, calib, c, score) for n, c in cle_configs()]
    return {"model": "efficientnet_lite0", "samples": n_eval, "calib": n_cal, "rows": rows}


def section_adaround(args: argparse.Namespace) -> dict[str, Any]:
    print("AdaRound: resnet_fmnist, W4A8 (4-bit per-channel weights)", flush=True)
    model = pretrained("resnet_fmnist")
    calib, xt, yt = fmnist(args.quick, 256 if args.quick else 1024)
    score = Scorer(model, xt, yt, 500)
    iters = 100 if args.quick else 1000
    base = PTQConfig(
        weights=W4,
        activations=A8,
        calibration="minmax",
        bias_correction=False,
        progress=False,
        adaround_iters=iters,
    )
    configs = [
        ("nearest, min-max weight ranges", base),
        ("nearest, MSE weight ranges", base.replace(weight_calibration="mse")),
        ("AdaRound, min-max weight ranges", base.replace(adaround=True)),
        ("AdaRound, MSE weight ranges", base.replace(adaround=True, weight_calibration="mse")),
        ("W8A8 per-channel (reference)", base.replace(weights=PER_CHANNEL)),
    ]
    rows = [run(n, model, calib, c, score) for n, c in configs]
    return {"model": "resnet_fmnist", "fp32": score.fp32, "iters": iters, "rows": rows}


def section_fallback(args: argparse.Namespace) -> dict[str, Any]:
    print("Fallback: resnet_fmnist, W4A8 nearest, target 0.5 points", flush=True)
    model = pretrained("resnet_fmnist")
    calib, xt, yt = fmnist(args.quick, 512 if args.quick else 2048)
    score = Scorer(model, xt, yt, 500)
    base = PTQConfig(
        weights=W4,
        activations=A8,
        weight_calibration="mse",
        calibration="minmax",
        bias_correction=False,
        progress=False,
    )
    rows = [
        run("no fallback", model, calib, base, score),
        run("max_degradation=0.5", model, calib, base.replace(max_degradation=0.5), score),
    ]
    d = rows[1]["qmodel"].ptq_info.details["fallback"]
    return {"model": "resnet_fmnist", "fp32": score.fp32, "rows": rows, "fallback": d}


SECTIONS = {
    "cle_fmnist": section_cle_fmnist,
    "cle_effnet": section_cle_effnet,
    "adaround": section_adaround,
    "fallback": section_fallback,
}


# -- report ------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]], labeled: bool) -> list[str]:
    head = "| configuration | " + ("top-1 % | drop (points) | " if labeled else "")
    head += "agreement with FP32 % | KL | algorithm time | quantize total |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        st = r["stages_s"]
        algo = ", ".join(
            f"{k} {v:.1f} s"
            for k, v in st.items()
            if k in ("cle", "bias_correction", "adaround", "fallback", "auto")
        )
        cells = [r["config"]]
        if labeled:
            cells += [f"{r['top1']:.2f}", f"{r['drop']:+.2f}"]
        cells += [
            f"{r['agreement']:.2f}",
            f"{r['kl']:.4f}",
            algo or "-",
            f"{r['quantize_s']:.1f} s",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def markdown(res: dict[str, Any], args: argparse.Namespace, cmd: str) -> str:
    env = res["env"]
    lines = [
        "# Accuracy recovery: CLE, bias correction, AdaRound, fallback",
        "",
        f"Command: `{cmd}`"
        + ("  (**quick mode: small subsets, not the reported numbers**)" if args.quick else ""),
        "",
        f"Machine: {env['cpu']}, torch {env['torch']}, {env['threads']} thread(s); "
        f"{env['date']}. Total {res['seconds']:.0f} s.",
        "",
    ]
    if "cle_fmnist" in res:
        s = res["cle_fmnist"]
        lines += [
            "## CLE + bias correction, MobileNetV2-style Fashion-MNIST "
            f"(FP32 top-1 {s['fp32']:.2f}%)",
            "",
            f"Per-tensor W8A8, activations min-max; top-1 on {s['samples']} test images.",
            "",
            *table(s["rows"], True),
            "",
            "This small model loses little at per-tensor W8A8 (its BatchNorm-folded weights have "
            "no extreme per-channel ranges, unlike ImageNet MobileNetV2, where per-tensor INT8 "
            "falls to ~0%). With 4-bit per-tensor weights it does lose "
            f"({s['rows_w4'][0]['drop']:.2f} points); what CLE and bias correction recover:",
            "",
            *table(s["rows_w4"], True),
            "",
        ]
    if "cle_effnet" in res:
        s = res["cle_effnet"]
        lines += [
            "## CLE + bias correction, EfficientNet-Lite0",
            "",
            f"Per-tensor W8A8, activations min-max; calibrated on {s['calib']} crops of the "
            f"scikit-image photos (seed 0), top-1 agreement with FP32 on {s['samples']} other "
            "crops (seed 1). No ImageNet labels here: agreement, not accuracy.",
            "",
            *table(s["rows"], False),
            "",
        ]
    if "adaround" in res:
        s = res["adaround"]
        lines += [
            f"## AdaRound, ResNet-style Fashion-MNIST (FP32 top-1 {s['fp32']:.2f}%)",
            "",
            f"W4A8: 4-bit symmetric per-channel weights, 8-bit activations; AdaRound "
            f"{s['iters']} iterations per layer.",
            "",
            *table(s["rows"], True),
            "",
        ]
    if "fallback" in res:
        s = res["fallback"]
        d = s["fallback"]
        lines += [
            f"## Automatic fallback, ResNet-style Fashion-MNIST (FP32 top-1 {s['fp32']:.2f}%)",
            "",
            "W4A8 nearest rounding (MSE weight ranges), `max_degradation=0.5`, measured by the "
            f"fallback on the {d['samples']} labeled calibration images; the table is the "
            "test set.",
            "",
            *table(s["rows"], True),
            "",
            f"On the calibration data: before {d['before']}, after {d['after']}, "
            f"target met: {d['met']}, {d['passes']} evaluation passes.",
            "",
            "Kept in float:",
            "",
            *[f"- `{k['layer']}` ({k['params']} weights): {k['why']}" for k in d["kept_float"]],
            "",
        ]
    lines += NOTES
    return "\n".join(lines)


NOTES = [
    "## Notes",
    "",
    "- Per-tensor W8A8: weights symmetric per-tensor, activations asymmetric per-tensor, min-max "
    "ranges; the network's output (logits) is not quantized.",
    "- CLE (`ptqkit/equalize/cle.py`) equalizes conv → ReLU/ReLU6/identity → conv pairs, "
    "depthwise chains and conv → pool → flatten → Linear, then absorbs high biases. A ReLU6 "
    "does not commute with the scaling, so each equalized ReLU6 use becomes a per-channel "
    "clamp `[0, 6/s_i]` (ONNX Relu/Max/Min): the float network is unchanged (tested to 1e-5). "
    "Bias absorption is applied only where it is exact (into 1×1 convs and Linear layers; a "
    "zero-padded k×k conv would see the constant missing at the borders).",
    "- Bias correction: `analytic` is data-free (BatchNorm statistics recorded at folding, "
    "propagated through ReLU/ReLU6 as clipped normals); `empirical` measures each layer's mean "
    "output error on (at most 256) calibration samples, layer by layer in execution order: a "
    "traced model runs once, node by node, over all those samples (cached layer inputs, "
    "`ptqkit/walk.py`), each layer corrected before the layers after it run, so its time grows "
    "with depth, not depth²; an untraced model falls back to one pass per layer.",
    "- AdaRound: rectified-sigmoid rounding, λ = 0.01, β 20 → 2 after 20 % warm-up, Adam "
    "(lr 1e-2), 1,024 sampled rows per step (256 for depthwise layers), at most 8,192 sampled "
    "rows per layer; the scale comes from the weight range (`weight_calibration`).",
    "- Fallback measures its target on the data given to `quantize` (the calibration images); "
    "the test-set numbers above show how that transfers.",
    "",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small subsets, few iterations")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"among {list(SECTIONS)}")
    ap.add_argument("--out", default=str(Path(__file__).with_name("RECOVERY.md")))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cmd = "python bench/bench_recovery.py " + " ".join(sys.argv[1:])
    res: dict[str, Any] = {
        "env": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
    }
    t0 = time.perf_counter()
    for name in args.sections.split(","):
        res[name.strip()] = SECTIONS[name.strip()](args)
    res["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.write_text(markdown(res, args, cmd.strip()) + "\n")
    for s in res.values():
        if isinstance(s, dict):
            for r in [*s.get("rows", []), *s.get("rows_w4", [])]:
                r.pop("qmodel", None)
    raw = Path(__file__).with_name("out") / (out.stem.lower() + ".json")
    raw.parent.mkdir(exist_ok=True)
    raw.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(f"wrote {out} and {raw}")


if __name__ == "__main__":
    main()
