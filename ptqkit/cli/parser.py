"""The arguments of ``ptqkit demo``, ``quantize``, ``compare`` and ``report`` (argparse): each
sub-command's ``func`` is the command to run."""

from __future__ import annotations

import argparse

from ..report.runtimes import RUNTIMES
from .commands import cmd_compare, cmd_quantize, cmd_report
from .demo import DEMO_TUNE_S, cmd_demo

#: one line per command in ``ptqkit --help``
HELP = {
    "demo": "quantize a real model on bundled data",
    "quantize": "quantize a model; write the quantized model, its ONNX export, the report and a "
    "JSON summary",
    "compare": "compare calibrators, per-tensor vs per-channel, CLE and bias correction "
    "(exercise 9.2.2)",
    "report": "write the HTML report of a model",
}


def _data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (image folders, arrays)")
    g.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    g.add_argument("--limit", type=int, default=None, help="use at most N samples")
    g.add_argument("--resize", type=int, help="resize the shorter image side to N pixels")
    g.add_argument("--crop", type=int, help="center-crop images to NxN")
    g.add_argument("--grayscale", action="store_true", help="read images as one channel")
    g.add_argument(
        "--mean",
        help="per-channel mean on [0,1] pixels, e.g. 0.485,0.456,0.406 (--resize, --crop, "
        "--grayscale, --mean/--std, --scale/--offset: image folders only; refused for arrays "
        "and loaders, which are used as they are)",
    )
    g.add_argument("--std", help="per-channel std, e.g. 0.229,0.224,0.225")
    g.add_argument("--scale", type=float, help="x*scale+offset on [0,255] pixels (default 1/255)")
    g.add_argument("--offset", type=float, help="see --scale (default 0)")


def _model_options(p: argparse.ArgumentParser, out_help: str, out_required: bool = True) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="package.module:callable (returns an nn.Module; ptqkit IMPORTS that module and "
        "CALLS the callable, which runs its code: use only code you trust; the current folder "
        "is searched after the installed packages) or a torch.export .pt2 file (never runs "
        "code; a static batch size is detected and used for all data)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="calibration data: package.module:callable "
        "(returns an iterable of batches), a folder of images, or a .npy/.npz file",
    )
    p.add_argument("--eval-data", help="held-out data to evaluate on (same forms as --data)")
    p.add_argument("--config", help="TOML file of PTQConfig fields (default: PTQConfig())")
    p.add_argument(
        "--metric",
        default="auto",
        choices=["auto", "top1", "top5", "agreement"],
        help="auto: top1 with labels, else agreement with the FP32 model",
    )
    p.add_argument("--out", required=out_required, help=out_help)
    p.add_argument("--force", action="store_true", help="overwrite existing output")


def _run_options(
    p: argparse.ArgumentParser, compare_help: str, max_plots: int, demo: bool = False
) -> None:
    """Options shared by the commands that quantize, export and report (demo, quantize)."""
    p.add_argument("--compare", action="store_true", help=compare_help)
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    p.add_argument(
        "--no-pt2",
        action="store_true",
        help="skip the PyTorch int8 run (torch.export + Inductor compilation: 10-60 s)",
    )
    p.add_argument(
        "--runtimes",
        metavar="NAMES",
        help="the int8 runtimes to run, comma-separated, of " + ",".join(RUNTIMES)
        + " (default: all; one whose package is missing is listed as not installed)",
    )
    p.add_argument("--max-plots", type=int, default=max_plots, help="plots per report section")
    p.add_argument(
        "--tune",
        type=float,
        metavar="SECONDS",
        default=None,
        help="search the best recipe (calibrators, bias correction, CLE, AdaRound) on held-out "
        "calibration samples within SECONDS, starting from the config (ptqkit.tune); 0: off"
        + (
            " (default: " + ", ".join(f"{m} {s:g}" for m, s in DEMO_TUNE_S.items()) + ")"
            if demo
            else " (default: off)"
        ),
    )


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="ptqkit", description="Post-training quantization for PyTorch models."
    )
    parser.add_argument("--version", action="version", version=f"ptqkit {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="no progress, logs or warnings")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--threads", type=int, help="CPU threads for PyTorch and ONNX Runtime")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", parents=[common], help=HELP["demo"])
    p.add_argument(
        "--model",
        choices=["efficientnet", "digits"],
        default="efficientnet",
        help="efficientnet: EfficientNet-Lite0 on photo crops (default); digits: a "
        "CNN on scikit-learn digits with labels",
    )
    p.add_argument("--out", default="ptqkit-demo", help="output folder (default ptqkit-demo)")
    p.add_argument("--force", action="store_true", help="overwrite existing output")
    p.add_argument("--calibration", default="mse", help="calibrator (default mse)")
    p.add_argument("--calibration-samples", type=int, help="default 128 (efficientnet), 512")
    p.add_argument("--eval-samples", type=int, help="default 128 (efficientnet), 360")
    _run_options(p, "also compare every method (slow)", max_plots=16, demo=True)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("quantize", parents=[common], help=HELP["quantize"])
    _model_options(p, "output folder")
    _data_options(p)
    _run_options(p, "also compare every method", max_plots=24)
    p.add_argument("--sensitivity", action="store_true", help="per-layer sensitivity table")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("compare", parents=[common], help=HELP["compare"])
    _model_options(p, "optional output folder (comparison.json, report.html)", False)
    _data_options(p)
    p.add_argument("--calibrators", help="comma-separated calibrators (default: all)")
    p.add_argument("--per-channel-only", action="store_true", help="skip per-tensor weights")
    p.add_argument("--no-recovery", action="store_true", help="skip the CLE / bias correction runs")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", parents=[common], help=HELP["report"])
    _model_options(p, "the .html file to write")
    _data_options(p)
    p.add_argument(
        "--quantized", help="a model saved by `ptqkit quantize` (default: quantize with --config)"
    )
    p.add_argument("--compare", action="store_true", help="include the comparison of methods")
    p.add_argument("--sensitivity", action="store_true", help="per-layer sensitivity table")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    p.add_argument("--max-plots", type=int, default=24, help="plots per report section")
    p.set_defaults(func=cmd_report)
    return parser
