"""``ptqkit.evaluate``: the float model against its quantized copy on the same data.

One pass over the data runs both models on every batch and accumulates, per sample:

* the metric of each model (``top1``, ``top5``, ``agreement`` or a callable);
* top-1 agreement: ``100 · mean(argmax f(x) == argmax q(x))``;
* the KL divergence of the softmax outputs, ``KL(p‖q) = Σ_c p_c (log p_c - log q_c)`` with
  ``p = softmax(f(x))`` (float) and ``q = softmax(q(x))`` (quantized), averaged over samples;

and reports the storage size of both models (see :func:`size_bytes`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError, ModelError, PTQWarning
from ..info import PTQInfo
from ..progress import progress
from ..scorer import OutputSelector, nonfinite_message
from .eval_batch import Sums, score_batch, with_targets
from .range_coverage import Coverage, CoverageMeter, coverage_message
from .size import size_bytes

#: degradation (points) above which :func:`evaluate` and the advice suggest remedies (the
#: chapter: "Considérer QAT si la dégradation est > 2-3%")
MAX_DEGRADATION = 2.0

Metric = Callable[[torch.Tensor, Any], float]


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` measured.

    Attributes:
        metric: the metric's name (``"top1"``, ``"top5"``, ``"agreement"`` or the callable's name).
        fp32: metric of the float model (percent for the built-in metrics).
        quantized: metric of the quantized model.
        degradation: ``fp32 - quantized`` (percentage points for the built-in metrics).
        agreement: top-1 agreement of the two models, percent of samples.
        kl: mean KL divergence ``KL(softmax(float) ‖ softmax(quantized))`` per sample (nats).
        size_bytes_fp32: storage of the float model (its state dict), or ``None`` if unknown.
        size_bytes_quantized: storage of the quantized model (integer weights at their bit
            width, scales, zero points, float biases, activation ranges), or ``None``.
        samples: number of samples evaluated.
        expected_cost: expected top-1 accuracy cost (points) under the float model's own class
            probabilities: ``100/N · Σ p(ĉ_f) - p(ĉ_q)`` (:func:`ptqkit.scorer.expected_cost`;
            0 where the two top-1 classes agree). Without labels it is what the changed
            classes can cost: a change where the float model hesitates costs little.
        coverage: ``{activation quantizer: Coverage}``, how the evaluation values fit each
            calibrated range (see :mod:`ptqkit.analysis.range_coverage`); empty for a model without
            ptqkit quantizers.
        warnings: the advice emitted (also issued as :class:`~ptqkit.PTQWarning`).
    """

    metric: str
    fp32: float
    quantized: float
    degradation: float
    agreement: float
    kl: float
    size_bytes_fp32: int | None
    size_bytes_quantized: int | None
    samples: int
    expected_cost: float = math.nan
    warnings: list[str] = field(default_factory=list)
    coverage: dict[str, Coverage] = field(default_factory=dict)

    @property
    def compression(self) -> float | None:
        """``size_bytes_fp32 / size_bytes_quantized`` (``None`` when a size is unknown)."""
        if not self.size_bytes_fp32 or not self.size_bytes_quantized:
            return None
        return self.size_bytes_fp32 / self.size_bytes_quantized

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        size = ""
        fp32_bytes, q_bytes = self.size_bytes_fp32, self.size_bytes_quantized
        if fp32_bytes and q_bytes:  # what `compression` needs
            size = (
                f", size {fp32_bytes / 1024:.1f} KiB -> "
                f"{q_bytes / 1024:.1f} KiB ({fp32_bytes / q_bytes:.2f}x)"
            )
        return (
            f"{self.metric}: fp32 {self.fp32:.2f}, quantized {self.quantized:.2f} "
            f"(degradation {self.degradation:+.2f}), agreement {self.agreement:.2f}%, "
            f"KL {self.kl:.4g}, expected top-1 cost {self.expected_cost:.2f} points, "
            f"{self.samples} samples{size}"
        )


# -- advice --------------------------------------------------------------------------------------
def _remedies(config: dict[str, Any]) -> str:
    """The chapter's remedies for a large degradation, minus what the config already does."""
    tips = []
    weights = config.get("weights") or {}
    if weights and not weights.get("per_channel", True):
        tips.append("per-channel weights (QuantSpec(per_channel=True))")
    if config and not config.get("cle", False):
        tips.append("cross-layer equalization (cle=True)")
    cal = config.get("calibration")
    tips.append(
        f"another calibrator than {cal!r} (e.g. 'mse', 'percentile' or 'auto')"
        if cal
        else "another calibrator ('mse', 'percentile' or 'auto')"
    )
    if config and not config.get("bias_correction"):
        tips.append("bias correction (bias_correction=True)")
    if config and config.get("max_degradation") is None:
        tips.append("automatic float fallback of the sensitive layers (max_degradation=...)")
    tips.append("quantization-aware training if PTQ cannot close the gap")
    return "; ".join(tips)


def judged_loss(degradation: float | None, metric: str | None, cost: float) -> float | None:
    """The loss the chapter's 2-3 % rule is applied to: the metric's degradation, except for
    ``agreement`` (no labels), whose misses include classes changed where the float model itself
    hesitates: there it is the expected top-1 cost under the float model's probabilities
    (:func:`ptqkit.scorer.expected_cost`), the label-free estimate of the accuracy lost."""
    if metric == "agreement" and degradation is not None and math.isfinite(cost):
        return cost
    return degradation


def degradation_message(degradation: float, metric: str | None, cost: float) -> str:
    """How much quantization costs, in the words of the advice."""
    if metric == "agreement" and math.isfinite(cost):
        return (
            f"quantization costs an expected {cost:.2f} points of top-1 accuracy (under the "
            f"float model's probabilities; agreement lost {degradation:.2f} points)"
        )
    return f"quantization costs {degradation:.2f} points of {metric}"


def _advice(res: EvalResult, qmodel: Any, known_unit: bool) -> list[str]:
    """The warnings for a result (the degradation of a metric of unknown unit is not judged)."""
    msgs = []
    info = getattr(qmodel, "ptq_info", None)
    config = getattr(info, "config", None) or {}
    loss = judged_loss(res.degradation if known_unit else None, res.metric, res.expected_cost)
    if loss is not None and loss > MAX_DEGRADATION:
        msgs.append(
            f"{degradation_message(res.degradation, res.metric, res.expected_cost)} (more "
            f"than {MAX_DEGRADATION:g}); try: {_remedies(config)}"
        )
    few = info.sample_shortfall() if isinstance(info, PTQInfo) else None
    if few:
        msgs.append(f"the quantized model was {few}")
    return msgs


# -- evaluate ------------------------------------------------------------------------------------
def evaluate(
    fp32_model: Any,
    qmodel: Any,
    data: Iterable[Any],
    metric: str | Metric = "top1",
    progress_bar: bool = True,
    output: OutputSelector = None,
) -> EvalResult:
    """Compare ``fp32_model`` and ``qmodel`` on ``data`` in one pass.

    Args:
        fp32_model: the float model (an ``nn.Module``, put in eval mode for the pass and restored
            to its mode afterwards; or any callable).
        qmodel: the model returned by :func:`ptqkit.quantize`, or any callable taking the same
            inputs (e.g. an ONNX Runtime wrapper; its size comes from its ``size_bytes``
            attribute if it has one).
        data: an iterable of batches, as for :func:`ptqkit.quantize`. The built-in ``top1`` /
            ``top5`` need ``(input, labels)`` batches with integer class labels.
        metric: ``"top1"``, ``"top5"`` (percent of samples), ``"agreement"`` (no labels: the
            float model scores 100, the quantized model its top-1 agreement), or a callable
            ``metric(outputs, targets) -> float`` (higher is better; ``outputs`` are the
            model's scores as a float CPU tensor of the model's output shape, integer and bool
            outputs keeping their dtype, ``targets`` the
            second item of the batch or ``None``), averaged over batches weighted by their
            number of samples. Outputs with more than 2 dims (``[N, C, ...]``) count one
            prediction per position for top-k, agreement and KL.
        progress_bar: show a progress bar (on a terminal).
        output: which tensor of the models' outputs to score: a dict key (or attribute name),
            a tuple index, or a callable ``output(model_output) -> tensor``. By default a
            tensor, the ``logits`` entry of a dict, or the only tensor of a tuple/dict; any
            other output is a :class:`DataError` listing its entries
            (see :mod:`ptqkit.analysis.outputs`).

    Integer and bool outputs (e.g. an ``argmax``) are predicted classes, compared by equality:
    ``agreement`` is the percentage of equal elements (of samples for a ``[N]`` output),
    ``top1`` the percentage of elements equal to their label; ``top5`` is refused and ``kl`` is
    ``nan`` (there are no scores).

    Returns:
        An :class:`EvalResult`. Warnings (issued as :class:`~ptqkit.PTQWarning` and kept in
        ``result.warnings``): a degradation above 2 points of a built-in metric (a callable's
        unit is unknown), with the chapter's remedies; a quantized model calibrated on fewer
        than 100 samples; activation quantizers saturated by the evaluation data (the
        calibration data does not represent it; see :mod:`ptqkit.analysis.range_coverage`).

    Raises:
        DataError: empty data, a batch a model rejects (named by index), ``top1``/``top5``
            without labels, an unknown metric, or an output with no obvious tensor to score.
    """
    name = _metric_name(metric)
    _check_roles(fp32_model, qmodel)
    with _eval_mode(fp32_model, qmodel):
        meter = CoverageMeter(qmodel)
        sums = Sums()
        with torch.no_grad(), meter:
            for i, batch in progress(with_targets(data), progress_bar, "evaluate"):
                sums.add(score_batch(fp32_model, qmodel, i, batch, name, metric, output, meter))
    msgs, res = _result(fp32_model, qmodel, name, metric, sums, meter.results())
    for msg in msgs:
        warnings.warn(msg, PTQWarning, stacklevel=2)
    return res


def _metric_name(metric: str | Metric) -> str:
    """The name :class:`EvalResult` reports for ``metric``; an unknown one is a DataError."""
    if isinstance(metric, str):
        if metric not in ("top1", "top5", "agreement"):
            raise DataError(
                f"unknown metric {metric!r}; use 'top1', 'top5', 'agreement' or a callable "
                "(outputs, targets) -> float"
            )
        return metric
    if callable(metric):
        return getattr(metric, "__name__", type(metric).__name__)
    raise DataError(f"metric must be a name or a callable, got {type(metric).__name__}")


@contextlib.contextmanager
def _eval_mode(*models: Any) -> Iterator[None]:
    """The ``nn.Module`` among ``models`` in eval mode inside, each back in its mode after."""
    modes = [(m, m.training) for m in models if isinstance(m, nn.Module)]
    for m, _ in modes:
        _set_training(m, False)
    try:
        yield
    finally:
        for m, training in modes:
            _set_training(m, training)


def _result(
    fp32_model: Any,
    qmodel: Any,
    name: str,
    metric: Any,
    sums: Sums,
    coverage: dict[str, Coverage],
) -> tuple[list[str], EvalResult]:
    """The advice to warn with and the :class:`EvalResult` of the summed batches; no scored
    sample is a ModelError (the float model's outputs were not finite) or a DataError."""
    samples = sums.samples
    nonfinite = nonfinite_message(*sums.bad, round(samples))
    if samples == 0:
        err = ModelError if sums.bad[1] else DataError
        raise err(f"evaluate: no sample can be scored: {nonfinite}")
    scale = 1.0 if callable(metric) and not isinstance(metric, str) else 100.0
    fp32 = scale * sums.score_f / samples
    quantized = scale * sums.score_q / samples
    degradation = fp32 - quantized
    res = EvalResult(
        metric=name,
        fp32=fp32,
        quantized=quantized,
        degradation=degradation,
        agreement=100.0 * sums.agree / samples,
        kl=sums.kl / samples,
        size_bytes_fp32=size_bytes(fp32_model),
        size_bytes_quantized=size_bytes(qmodel),
        samples=round(samples),
        expected_cost=100.0 * sums.cost / samples,
        coverage=coverage,
    )
    msgs = [nonfinite] if nonfinite else []
    msgs += _advice(res, qmodel, isinstance(metric, str))
    msg = coverage_message(coverage)
    if msg is not None:
        msgs.append(msg)
    res.warnings.extend(msgs)
    return msgs, res


def _quantized(model: Any) -> bool:
    """Whether ``model`` holds ptqkit's quantized layers or activation quantizers."""
    if not isinstance(model, nn.Module):
        return False
    from ..quant.modules import act_quants, quant_layers

    return bool(quant_layers(model) or act_quants(model))


def _check_roles(fp32_model: Any, qmodel: Any) -> None:
    """The first argument of :func:`evaluate` is the float reference: a ptqkit-quantized model
    there would be reported as "fp32" (its degradation negated, its size ratio inverted)."""
    if not _quantized(fp32_model):
        return
    if not _quantized(qmodel):
        raise ConfigError(
            "evaluate(fp32_model, qmodel, data): the first argument holds ptqkit's quantized "
            "layers and the second does not: the arguments look swapped; call "
            "evaluate(float_model, quantized_model, data)"
        )
    raise ConfigError(
        "evaluate(fp32_model, qmodel, data): both models hold ptqkit's quantized layers, but "
        "the first must be the float reference (its metric is reported as fp32, the "
        "degradation against it); evaluate each quantized model against the float model it "
        "was made from: evaluate(float_model, qA, data), evaluate(float_model, qB, data)"
    )


def _set_training(model: nn.Module, training: bool) -> None:
    """``model.train(training)``; a module that refuses to switch (the module of a
    ``torch.export`` program raises ``NotImplementedError``) runs as it is."""
    with contextlib.suppress(NotImplementedError):
        model.train(training)
