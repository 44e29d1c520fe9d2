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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import batch_size, batch_target, iter_batches, model_device, run_model, to_device
from ..errors import DataError, PTQWarning
from ..progress import progress

#: degradation (points) above which :func:`evaluate` advises remedies (the chapter's 2-3 %)
MAX_DEGRADATION = 2.0
#: calibration samples below which :func:`evaluate` warns (the chapter's "at least 100-1000")
MIN_CALIBRATION_SAMPLES = 100

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
    warnings: list[str] = field(default_factory=list)

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
        if self.compression is not None:
            size = (
                f", size {self.size_bytes_fp32 / 1024:.1f} KiB -> "
                f"{self.size_bytes_quantized / 1024:.1f} KiB ({self.compression:.2f}x)"
            )
        return (
            f"{self.metric}: fp32 {self.fp32:.2f}, quantized {self.quantized:.2f} "
            f"(degradation {self.degradation:+.2f}), agreement {self.agreement:.2f}%, "
            f"KL {self.kl:.4g}, {self.samples} samples{size}"
        )


# -- sizes ---------------------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor, bits: int | None = None) -> int:
    if bits is None:
        return t.numel() * t.element_size()
    return math.ceil(t.numel() * bits / 8)


def size_bytes(model: Any) -> int | None:
    """Bytes a model needs in storage.

    * an object with a ``size_bytes`` attribute (an int, or a method returning one), such as
      an ONNX Runtime session wrapper: that value;
    * otherwise an ``nn.Module``: every tensor of its state dict (parameters and persistent
      buffers; non-persistent caches such as the dequantized weights of a quantized layer are
      not stored), each shared tensor counted once. A quantized layer's integer weights count
      at their bit width (``ceil(n·bits/8)`` bytes: at 8 bits, their real ``int8`` storage;
      below 8 bits the packed size a deployment format stores — ptqkit's own file keeps one
      byte per value);
      scales, zero points, float biases and activation ranges count at their dtype;
    * otherwise ``None``.
    """
    size = getattr(model, "size_bytes", None)
    if size is not None:
        return int(size() if callable(size) else size)
    if not isinstance(model, nn.Module):
        return None
    from ..quant.modules import quant_layers

    bits = {f"{n}.weight_int": m.spec.bits for n, m in quant_layers(model).items()}
    total, seen = 0, set()
    for key, t in model.state_dict(keep_vars=False).items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        total += _tensor_bytes(t, bits.get(key))
    return total


# -- outputs -------------------------------------------------------------------------------------
def _scores(out: Any, who: str) -> torch.Tensor:
    """The tensor of class scores in a model output (a tensor, the first item of a tuple/list,
    or the ``"logits"`` entry of a dict-like output), as a float CPU tensor."""
    if isinstance(out, dict) or hasattr(out, "logits"):
        out = out["logits"] if isinstance(out, dict) and "logits" in out else out.logits
    elif isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) and hasattr(out, "__array__"):
        out = torch.as_tensor(out)
    if not isinstance(out, torch.Tensor):
        raise DataError(f"the {who} model returned a {type(out).__name__}, not a tensor of scores")
    return out.detach().cpu().float()


def _rows(scores: torch.Tensor) -> torch.Tensor:
    """Scores as ``[rows, classes]``: ``[N, C]`` as is, ``[N, C, ...]`` (one prediction per
    position) as ``[N·..., C]``, a vector as one column."""
    if scores.dim() == 0:
        return scores.reshape(1, 1)
    if scores.dim() == 1:
        return scores.unsqueeze(1)
    if scores.dim() > 2:
        return scores.movedim(1, -1).reshape(-1, scores.shape[1])
    return scores


def _topk_hits(logits: torch.Tensor, target: Any, k: int) -> float:
    """Number of rows whose target is among the ``k`` highest scores."""
    t = torch.as_tensor(target).reshape(-1).to(torch.int64)
    if t.numel() != logits.shape[0]:
        raise DataError(
            f"{t.numel()} labels for {logits.shape[0]} outputs: labels must be class indices, "
            "one per sample"
        )
    if k > logits.shape[1]:
        raise DataError(f"top{k} needs at least {k} classes; the model outputs {logits.shape[1]}")
    top = logits.topk(k, dim=1).indices
    return float((top == t[:, None]).any(dim=1).sum())


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


def _advice(res_degradation: float | None, metric: str, qmodel: Any) -> list[str]:
    """The warnings for a result (``res_degradation`` is ``None`` for a metric of unknown unit)."""
    msgs = []
    info = getattr(qmodel, "ptq_info", None)
    config = getattr(info, "config", None) or {}
    if res_degradation is not None and res_degradation > MAX_DEGRADATION:
        msgs.append(
            f"quantization costs {res_degradation:.2f} points of {metric} (more than "
            f"{MAX_DEGRADATION:g}); try: {_remedies(config)}"
        )
    seen = getattr(info, "calibration_samples", None)
    if (
        seen is not None
        and config.get("activations") is not None
        and (seen < MIN_CALIBRATION_SAMPLES)
    ):
        msgs.append(
            f"the quantized model was calibrated on only {seen} samples; use at least "
            f"{MIN_CALIBRATION_SAMPLES}-1000 representative samples"
        )
    return msgs


# -- evaluate ------------------------------------------------------------------------------------
def evaluate(
    fp32_model: Any,
    qmodel: Any,
    data: Iterable[Any],
    metric: str | Metric = "top1",
    progress_bar: bool = True,
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
            model's scores as a float CPU tensor of the model's output shape, ``targets`` the
            second item of the batch or ``None``), averaged over batches weighted by their
            number of samples. Outputs with more than 2 dims (``[N, C, ...]``) count one
            prediction per position for top-k, agreement and KL.
        progress_bar: show a progress bar (on a terminal).

    Returns:
        An :class:`EvalResult`. Warnings (issued as :class:`~ptqkit.PTQWarning` and kept in
        ``result.warnings``): a degradation above 2 points of a built-in metric (a callable's
        unit is unknown), with the chapter's remedies, and a quantized model calibrated on fewer
        than 100 samples.

    Raises:
        DataError: empty data, a batch a model rejects (named by index), ``top1``/``top5``
            without labels, or an unknown metric.
    """
    if isinstance(metric, str):
        if metric not in ("top1", "top5", "agreement"):
            raise DataError(
                f"unknown metric {metric!r}; use 'top1', 'top5', 'agreement' or a callable "
                "(outputs, targets) -> float"
            )
        name = metric
    elif callable(metric):
        name = getattr(metric, "__name__", type(metric).__name__)
    else:
        raise DataError(f"metric must be a name or a callable, got {type(metric).__name__}")

    modes = [(m, m.training) for m in (fp32_model, qmodel) if isinstance(m, nn.Module)]
    for m, _ in modes:
        _set_training(m, False)
    score_f = score_q = agree = kl = 0.0
    samples = 0
    try:
        with torch.no_grad():
            for i, batch in progress(_with_targets(data), progress_bar, "evaluate"):
                (args, kwargs), target = batch
                if name in ("top1", "top5") and target is None:
                    raise DataError(
                        f"metric {name!r} needs labels, but batch {i} has none: give "
                        "(input, labels) batches, or use metric='agreement' to compare the "
                        "two models without labels"
                    )
                raw_f = _scores(_call(fp32_model, i, args, kwargs), "float")
                raw_q = _scores(_call(qmodel, i, args, kwargs), "quantized")
                if raw_f.shape != raw_q.shape:
                    raise DataError(
                        f"batch {i}: the float model returned shape {tuple(raw_f.shape)} but the "
                        f"quantized model {tuple(raw_q.shape)}"
                    )
                out_f, out_q = _rows(raw_f), _rows(raw_q)
                n = batch_size(args, kwargs)
                rows = out_f.shape[0]
                same = out_f.argmax(1) == out_q.argmax(1)
                agree += float(same.sum()) * n / rows
                logp, logq = F.log_softmax(out_f, 1), F.log_softmax(out_q, 1)
                kl_rows = (logp.exp() * (logp - logq)).sum(1).clamp(min=0.0)
                kl += float(kl_rows.sum()) * n / rows
                if name == "agreement":
                    score_f += n
                    score_q += float(same.sum()) * n / rows
                elif name in ("top1", "top5"):
                    k = 1 if name == "top1" else 5
                    score_f += _topk_hits(out_f, target, k) * n / rows
                    score_q += _topk_hits(out_q, target, k) * n / rows
                else:
                    score_f += float(metric(raw_f, target)) * n
                    score_q += float(metric(raw_q, target)) * n
                samples += n
    finally:
        for m, training in modes:
            _set_training(m, training)

    scale = 1.0 if callable(metric) and not isinstance(metric, str) else 100.0
    fp32 = scale * score_f / samples
    quantized = scale * score_q / samples
    degradation = fp32 - quantized
    msgs = _advice(degradation if isinstance(metric, str) else None, name, qmodel)
    for msg in msgs:
        warnings.warn(msg, PTQWarning, stacklevel=2)
    return EvalResult(
        metric=name,
        fp32=fp32,
        quantized=quantized,
        degradation=degradation,
        agreement=100.0 * agree / samples,
        kl=kl / samples,
        size_bytes_fp32=size_bytes(fp32_model),
        size_bytes_quantized=size_bytes(qmodel),
        samples=samples,
        warnings=msgs,
    )


def _set_training(model: nn.Module, training: bool) -> None:
    """``model.train(training)``; a module that refuses to switch (the module of a
    ``torch.export`` program raises ``NotImplementedError``) runs as it is."""
    with contextlib.suppress(NotImplementedError):
        model.train(training)


def _with_targets(data: Iterable[Any]) -> Iterable[tuple[int, tuple[Any, Any]]]:
    """``(index, ((args, kwargs), target))`` for each batch, validated by :func:`iter_batches`."""
    if isinstance(data, (torch.Tensor, dict)) or not isinstance(data, Iterable):
        yield from iter_batches(data)  # raises the DataError that says what to pass instead
        return
    batches: list[Any] = []

    def raw() -> Iterable[Any]:
        for b in data:
            batches.append(b)
            yield b

    for i, split in iter_batches(raw(), None):
        target = batch_target(batches.pop())
        yield i, (split, target)


def _call(model: Any, index: int, args: tuple, kwargs: dict) -> Any:
    if isinstance(model, nn.Module):
        args, kwargs = to_device(args, kwargs, model_device(model))
    elif not callable(model):
        raise DataError(f"a model must be an nn.Module or a callable, got {type(model).__name__}")
    return run_model(model, index, args, kwargs)
