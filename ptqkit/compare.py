"""The chapter's exercise 9.2.2: compare PTQ methods on one model, in one table.

Phase 1 quantizes the model with every registered calibrator (and ``"auto"`` when available),
per-tensor and per-channel weights. Phase 2 takes the best per-tensor and the best per-channel
method of phase 1 and adds cross-layer equalization, bias correction and both (when those stages
are installed). Every method is a full :func:`ptqkit.quantize` run followed by
:func:`ptqkit.evaluate`, timed; rows are sorted by the quantized model's metric.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .calibrate import CALIBRATORS
from .config import PTQConfig
from .data import batch_target
from .errors import ConfigError, ModelError, PTQError, PTQWarning
from .progress import progress


@dataclass(frozen=True)
class Method:
    """A named configuration to compare."""

    name: str
    config: PTQConfig


@dataclass
class Row:
    """One compared method: its settings, the evaluation, and the time it took."""

    method: str
    calibration: str
    per_channel: bool
    cle: bool
    bias_correction: bool | str
    fp32: float | None = None
    quantized: float | None = None
    degradation: float | None = None
    agreement: float | None = None
    kl: float | None = None
    quantize_s: float = 0.0
    evaluate_s: float = 0.0
    error: str = ""


@dataclass
class Comparison:
    """Rows sorted by the quantized metric (best first); failed methods last, with the error."""

    metric: str
    rows: list[Row] = field(default_factory=list)
    #: the quantized model of the best row (kept only when asked)
    best_model: nn.Module | None = None

    def best(self) -> Row | None:
        ok = [r for r in self.rows if not r.error and r.quantized is not None]
        return ok[0] if ok else None

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "rows": [dataclasses.asdict(r) for r in self.rows]}

    def table(self) -> str:
        """A plain-text table, one line per method."""
        head = (
            f"{'method':<36} {self.metric:>10} {'degr.':>7} {'agree %':>8} {'KL':>9} "
            f"{'quant s':>8} {'eval s':>7}"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            if r.error:
                lines.append(f"{r.method[:36]:<36} failed: {r.error}")
                continue
            lines.append(
                f"{r.method[:36]:<36} {r.quantized:>10.2f} {r.degradation:>+7.2f} "
                f"{r.agreement:>8.2f} {r.kl:>9.3g} {r.quantize_s:>8.2f} {r.evaluate_s:>7.2f}"
            )
        fp32 = next((r.fp32 for r in self.rows if r.fp32 is not None), None)
        if fp32 is not None:
            lines.append(f"{'FP32 reference':<36} {fp32:>10.2f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# -- methods -------------------------------------------------------------------------------------
def available(stage: str) -> bool:
    """Whether an optional stage (``"cle"``, ``"bias_correction"``, ``"auto"``) is installed."""
    module = {
        "cle": "ptqkit.equalize.cle",
        "bias_correction": "ptqkit.correct.bias",
        "auto": "ptqkit.calibrate.auto",
    }[stage]
    return importlib.util.find_spec(module) is not None


def method_name(config: PTQConfig) -> str:
    """``"kl / per-channel + CLE + BC"``."""
    name = f"{config.calibration} / " + (
        "per-channel" if config.weights.per_channel else "per-tensor"
    )
    if config.cle:
        name += " + CLE"
    if config.bias_correction:
        name += " + BC"
    return name


def calibrator_methods(
    base: PTQConfig, calibrators: Sequence[str] | None = None, granularity: bool = True
) -> list[Method]:
    """Phase 1: every calibrator (default: all registered, plus ``"auto"`` when installed),
    with per-channel and (``granularity``) per-tensor weights; no CLE or bias correction."""
    if calibrators is None:
        calibrators = sorted(CALIBRATORS) + (["auto"] if available("auto") else [])
    unknown = [c for c in calibrators if c not in CALIBRATORS and c != "auto"]
    if unknown:
        raise ConfigError(f"unknown calibrator(s) {unknown}; registered: {sorted(CALIBRATORS)}")
    plain = base.replace(cle=False, bias_correction=False)
    grans = [True, False] if granularity else [base.weights.per_channel]
    out = []
    for pc in grans:
        weights = dataclasses.replace(base.weights, per_channel=pc)
        for cal in calibrators:
            options = base.calibrator_options if cal == base.calibration else {}
            cfg = plain.replace(weights=weights, calibration=cal, calibrator_options=options)
            out.append(Method(method_name(cfg), cfg))
    return out


def recovery_methods(config: PTQConfig) -> list[Method]:
    """Phase 2 for one configuration: + CLE, + bias correction, + both (those installed)."""
    variants = []
    if available("cle"):
        variants.append({"cle": True})
    if available("bias_correction"):
        variants.append({"bias_correction": True})
    if len(variants) == 2:
        variants.append({"cle": True, "bias_correction": True})
    return [Method(method_name(c), c) for c in (config.replace(**v) for v in variants)]


def detect_metric(data: Iterable[Any]) -> str:
    """``"top1"`` when the first batch carries integer class labels, else ``"agreement"``."""
    for batch in data:
        target = batch_target(batch)
        if isinstance(target, torch.Tensor) and not torch.is_floating_point(target):
            return "top1"
        return "agreement"
    return "agreement"


# -- running -------------------------------------------------------------------------------------
def run_method(
    model: nn.Module, data: Iterable[Any], eval_data: Iterable[Any], method: Method, metric: str
) -> tuple[Row, nn.Module | None]:
    """Quantize and evaluate one method; a failure is recorded in the row, not raised."""
    from .analysis.metrics import evaluate
    from .pipeline import quantize

    c = method.config
    row = Row(method.name, c.calibration, c.weights.per_channel, c.cle, c.bias_correction)
    qmodel = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTQWarning)
        try:
            t0 = time.perf_counter()
            qmodel = quantize(model, data, c)
            row.quantize_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = evaluate(model, qmodel, eval_data, metric, progress_bar=False)
            row.evaluate_s = time.perf_counter() - t0
        except Exception as e:  # one failing method must not stop the comparison
            msg = str(e).splitlines()[0] if str(e) else ""
            row.error = msg if isinstance(e, PTQError) else f"{type(e).__name__}: {msg}"
            return row, None
    row.fp32, row.quantized, row.degradation = res.fp32, res.quantized, res.degradation
    row.agreement, row.kl = res.agreement, res.kl
    return row, qmodel


def _key(r: Row) -> tuple:
    return (bool(r.error), -(r.quantized if r.quantized is not None else float("-inf")), r.kl or 0)


def compare(
    model: nn.Module,
    data: Iterable[Any],
    eval_data: Iterable[Any] | None = None,
    base: PTQConfig | None = None,
    *,
    metric: str = "auto",
    calibrators: Sequence[str] | None = None,
    granularity: bool = True,
    recovery: bool = True,
    methods: Sequence[Method] | None = None,
    keep_best: bool = False,
    on_row: Callable[[Row], None] | None = None,
    progress_bar: bool = True,
) -> Comparison:
    """Compare PTQ methods on ``model`` (see the module docstring).

    Args:
        model: the float model.
        data: calibration batches (iterated once per method, more by the stages that say so).
        eval_data: held-out batches to evaluate on (default: ``data``).
        base: the configuration the methods vary (bits, symmetry, num_batches, ...).
        metric: ``"top1"``, ``"top5"``, ``"agreement"``, a callable, or ``"auto"`` (top-1 when
            the evaluation batches carry labels, else agreement with the float model).
        calibrators: the calibrators of phase 1 (default: all).
        granularity: compare per-tensor weights too.
        recovery: run phase 2 (CLE / bias correction on the best methods).
        methods: run exactly these methods instead of the two phases.
        keep_best: keep the best quantized model in ``Comparison.best_model``.
        on_row: called with each row as soon as it is measured (for logging).
        progress_bar: show a progress bar over the methods (on a terminal).
    """
    _refuse_quantized(model)
    base = PTQConfig() if base is None else base
    base = base.replace(progress=False, max_degradation=None, min_sqnr_db=None)
    eval_data = data if eval_data is None else eval_data
    if metric == "auto":
        metric = detect_metric(eval_data)
    result = Comparison(metric=metric if isinstance(metric, str) else metric.__name__)
    best: tuple[tuple, nn.Module] | None = None

    def run(todo: Sequence[Method], desc: str) -> None:
        nonlocal best
        for m in progress(todo, progress_bar, desc, total=len(todo)):
            row, q = run_method(model, data, eval_data, m, metric)
            result.rows.append(row)
            if keep_best and q is not None and (best is None or _key(row) < best[0]):
                best = (_key(row), q)
            if on_row is not None:
                on_row(row)

    if methods is not None:
        run(list(methods), "compare")
    else:
        run(calibrator_methods(base, calibrators, granularity), "compare calibrators")
        if recovery:
            run(_recovery_methods(base, result.rows), "compare recovery")
    result.rows.sort(key=_key)
    result.best_model = best[1] if best is not None else None
    return result


def _refuse_quantized(model: nn.Module) -> None:
    """A model that already holds ptqkit's quantizers is a ModelError: every method would fail
    with the same error, and two quantized models compared with each other have no float
    reference: say it once, before any method runs."""
    from .quant.modules import act_quants, quant_layers

    if isinstance(model, nn.Module) and (quant_layers(model) or act_quants(model)):
        raise ModelError(
            "compare(model, ...) needs the float model: this one already holds ptqkit's "
            "quantized layers; pass the float model it was made from"
        )


def _recovery_methods(base: PTQConfig, rows: list[Row]) -> list[Method]:
    """Phase 2: CLE / bias correction on the best calibrator of phase 1, for each weight
    granularity that has one (per-channel first), minus the methods already run."""
    done = {r.method: r for r in rows}
    todo: list[Method] = []
    for pc in sorted({r.per_channel for r in rows}, reverse=True):
        ok = [r for r in done.values() if r.per_channel == pc and not r.error]
        if not ok:
            continue
        top = min(ok, key=_key)
        weights = dataclasses.replace(base.weights, per_channel=pc)
        cfg = base.replace(
            weights=weights, calibration=top.calibration, cle=False, bias_correction=False
        )
        if top.calibration != base.calibration:
            cfg = cfg.replace(calibrator_options={})
        todo += [m for m in recovery_methods(cfg) if m.name not in done]
    return todo


__all__ = [
    "Comparison",
    "Method",
    "Row",
    "available",
    "calibrator_methods",
    "compare",
    "detect_metric",
    "method_name",
    "recovery_methods",
    "run_method",
]
