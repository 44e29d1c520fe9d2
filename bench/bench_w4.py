"""EfficientNet-Lite0 with 4-bit weights (W4A8, per-channel, symmetric): what weight ranges and
bias correction buy where every peer toolkit collapses (below 41% agreement, issue 14).

Rows: min/max weight ranges alone; MSE-searched weight ranges alone; MSE weights + empirical
(mean-only) bias correction; MSE weights + scale-and-bias correction (``bias_correction=
"affine"``, the default's ``"auto"``). Same crops and scores as ``bench_onepass.py``: 128
calibration crops, top-1 agreement and KL with FP32 on other crops. Writes ``bench/W4A8.md``.

    python bench/bench_w4.py [--eval 1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from bench_onepass import batches, logits, run, table

import ptqkit
from ptqkit import PTQConfig, QuantSpec
from ptqkit.zoo import pretrained
from ptqkit.zoo.data import photo_crops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).with_name("W4A8.md")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    model = pretrained("efficientnet_lite0").eval()
    calib = batches(photo_crops(args.calib, seed=0), 16)
    x_eval = photo_crops(args.eval, seed=1)
    ref = logits(model, x_eval)
    w4 = PTQConfig(progress=False, weights=QuantSpec(bits=4, symmetric=True, per_channel=True))
    mse_w = w4.replace(weight_calibration="mse")
    configs = {
        "min/max weight ranges, no bias correction": w4.replace(bias_correction=False),
        "MSE weight ranges, no bias correction": mse_w.replace(bias_correction=False),
        "MSE weight ranges + empirical bias correction": mse_w.replace(bias_correction="empirical"),
        "MSE weight ranges + scale-and-bias correction (affine)": mse_w.replace(
            bias_correction="affine"
        ),
    }
    rows = [
        run(name, lambda cfg=cfg: ptqkit.quantize(model, calib, cfg), x_eval, ref)
        for name, cfg in configs.items()
    ]
    setup = (
        f"4-bit symmetric per-channel weights, 8-bit activations (mse ranges), {args.calib} "
        f"calibration crops (seed 0, batches of 16), top-1 agreement and KL with FP32 on "
        f"{args.eval} other crops (seed 1)."
    )
    title = "EfficientNet-Lite0, W4A8: weight ranges and bias correction"
    lines = table("bench_w4.py", title, setup, args.threads, load0, t0, rows)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
