"""The one scorer (DESIGN.md: output selection, SQNR, KL, agreement): which tensor of a
model's output is scored, and how a float reference output and a quantized one are compared,
batch by batch. :func:`ptqkit.evaluate`, :func:`ptqkit.sensitivity`, the float fallback and
``tune``'s held-out score all call :func:`select` and :func:`compare`, so that they give the
same verdict on the same model and data.

Output selection. A model may return a tensor, a tuple/list, a dict (or a ``ModelOutput`` with
a ``logits`` attribute). Without an ``output=`` selector the scored tensor is:

* a tensor: itself;
* a dict-like output: its ``"logits"`` entry (key or attribute), else its only tensor value;
* a tuple/list: its only tensor item (e.g. ``(logits, past_key_values)`` or ``(logits, None)``).

Anything else (two tensors and none called ``logits``) is ambiguous: guessing would score the
wrong tensor and report a number that means nothing, so a :class:`~ptqkit.DataError` lists the
entries and says how to choose (``output="key"``, ``output=index`` or ``output=callable``).

Integer and bool outputs (an ``argmax``, a mask) are predictions, not scores: they are compared
by equality, never through ``argmax``/``softmax`` (an argmax of a ``[N]`` label vector seen as one
column is always 0, which would report 100 % agreement whatever the labels) and never by SQNR
(the SQNR of class indices measures how far apart class numbers are, which means nothing).

Comparison (:func:`compare`), per batch of ``n`` samples, float output ``f``, quantized ``q``:

* agreement: ``argmax f == argmax q`` per prediction row (``[N, C]``: per sample, ``[N, C, ...]``:
  per position), ``f == q`` per element for integer/bool outputs; each row weighs
  ``n / rows`` samples;
* ``KL(p‖q) = Σ_c p_c (log p_c - log q_c)``, ``p = softmax(f)``, ``q = softmax(q)`` (float64);
* SQNR ``10·log10(Σ f² / Σ (f - q)²)`` from the summed energies;
* **expected top-1 cost** ``Σ_rows p(ĉ_f) - p(ĉ_q)``, ``p`` the float model's probabilities
  (``softmax(f)``, or ``f`` if its rows are distributions), ``ĉ`` the top-1 classes: 0 where
  they agree. If ``p`` is calibrated (``P(label = c | x) = p(c)``) its mean is the top-1
  accuracy the quantized model is expected to lose, ``E[acc_f - acc_q]``, without labels: a
  class changed where the float model hesitates costs little (agreement counts it a full miss).

Non-finite values (NaN, ±Inf). A sample whose input or float output is not finite has no
reference to compare with: it is left out of every score and counted (``bad_input``,
``bad_float``), and the callers say so in a warning (evaluate) or an error. A sample where only
the quantized output is not finite is the quantized model's failure: it stays in, its
predictions count as misses, and its KL and noise are infinite (``bad_quant``). When the
output's first dimension is not the batch's, a batch is kept or left out as a whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .errors import DataError

#: ``output=`` of :func:`ptqkit.evaluate`: a key, an index, or ``fn(output) -> tensor``
OutputSelector = str | int | Callable[[Any], Any] | None


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
    return type(v).__name__


def _entries(out: Any) -> list[tuple[Any, Any]]:
    if isinstance(out, Mapping):
        return list(out.items())
    return list(enumerate(out))


def _ambiguous(out: Any, who: str, api: str | None) -> DataError:
    listed = ", ".join(f"{k!r}: {_describe(v)}" for k, v in _entries(out))
    what = "dict" if isinstance(out, Mapping) else type(out).__name__
    example = next(iter(k for k, _ in _entries(out)), 0)
    how = (
        f"choose one with {api}(..., output={example!r}) (a key or an index) or "
        "output=lambda out: ... (a callable returning the tensor of scores)"
        if api
        else "the float fallback (max_degradation / min_sqnr_db) cannot be told which: make "
        "the model return its scores as its only tensor (or a dict with a 'logits' entry)"
    )
    return DataError(
        f"the {who} model returned a {what} with no obvious tensor to score ({listed}); {how}"
    )


def select(
    out: Any, output: OutputSelector, who: str, api: str | None = "evaluate"
) -> torch.Tensor:
    """The tensor to score in ``out`` (see the module docstring), detached, on the CPU, with
    its dtype (float outputs are converted to float32, integer and bool ones kept). ``api``
    names the call whose ``output=`` chooses in an error (``None``: there is none)."""
    if output is not None:
        try:
            if callable(output):
                out = output(out)
            elif isinstance(output, str) and not isinstance(out, Mapping):
                out = getattr(out, output)
            else:
                out = out[output]
        except (KeyError, IndexError, AttributeError, TypeError) as e:
            entries = (
                ", ".join(repr(k) for k, _ in _entries(out))
                if isinstance(out, (Mapping, tuple, list))
                else _describe(out)
            )
            raise DataError(
                f"output={output!r} cannot be taken from the {who} model's output "
                f"({type(e).__name__}: {e}); it holds: {entries}"
            ) from None
    elif isinstance(out, Mapping) or hasattr(out, "logits"):
        if isinstance(out, Mapping) and "logits" in out:
            out = out["logits"]
        elif not isinstance(out, Mapping):
            out = out.logits
        else:
            tensors = [v for v in out.values() if isinstance(v, torch.Tensor)]
            if len(tensors) != 1:
                raise _ambiguous(out, who, api)
            out = tensors[0]
    elif isinstance(out, (tuple, list)):
        tensors = [v for v in out if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise _ambiguous(out, who, api)
        out = tensors[0]
    if not isinstance(out, torch.Tensor) and hasattr(out, "__array__"):
        out = torch.as_tensor(out)
    if not isinstance(out, torch.Tensor):
        raise DataError(
            f"the {who} model returned a {type(out).__name__}, not a tensor of scores"
            + (f"; choose the tensor with {api}(..., output=...)" if api else "")
        )
    out = out.detach().cpu()
    return out if is_discrete(out) else out.float()


def is_discrete(t: torch.Tensor) -> bool:
    """Integer or bool: predictions compared by equality, not scores."""
    return not (t.is_floating_point() or t.is_complex())


def equal_share(f: torch.Tensor, q: torch.Tensor) -> tuple[float, int]:
    """``(number of equal elements, number of elements)`` of two discrete outputs."""
    return float((f == q).sum()), f.numel()


def discrete_hits(pred: torch.Tensor, target: Any) -> tuple[float, int]:
    """``(correct predictions, predictions)`` of a discrete output against labels of the same
    number of elements (one label per sample for ``[N]``, per position for ``[N, ...]``)."""
    t = torch.as_tensor(target).reshape(-1).to(torch.int64)
    p = pred.reshape(-1).to(torch.int64)
    if t.numel() != p.numel():
        raise DataError(
            f"{t.numel()} labels for {p.numel()} predicted classes: an integer output is "
            "compared with the labels element by element"
        )
    return float((p == t).sum()), p.numel()


def as_rows(scores: torch.Tensor) -> torch.Tensor:
    """Scores as ``[rows, classes]``: ``[N, C]`` as is, ``[N, C, ...]`` (one prediction per
    position) as ``[N·..., C]``, a vector as one column."""
    if scores.dim() == 0:
        return scores.reshape(1, 1)
    if scores.dim() == 1:
        return scores.unsqueeze(1)
    if scores.dim() > 2:
        return scores.movedim(1, -1).reshape(-1, scores.shape[1])
    return scores


def topk_hits(
    logits: torch.Tensor, target: Any, k: int, valid: torch.Tensor | None = None
) -> float:
    """Number of rows whose target is among the ``k`` highest scores (rows not ``valid``,
    e.g. with a NaN score, are misses)."""
    t = torch.as_tensor(target).reshape(-1).to(torch.int64)
    if t.numel() != logits.shape[0]:
        raise DataError(
            f"{t.numel()} labels for {logits.shape[0]} outputs: labels must be class indices, "
            "one per sample"
        )
    if k > logits.shape[1]:
        raise DataError(f"top{k} needs at least {k} classes; the model outputs {logits.shape[1]}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= logits.shape[1]):
        bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
        raise DataError(
            f"label {bad} is not a class index of a model with {logits.shape[1]} outputs; "
            "labels must be integers in [0, classes)"
        )
    hit = (logits.topk(k, dim=1).indices == t[:, None]).any(dim=1)
    return float((hit & valid).sum() if valid is not None else hit.sum())


# -- comparing a quantized output with its float reference ---------------------------------------
def kind(ref: torch.Tensor) -> str:
    """What a reference output is: ``"discrete"`` (integer/bool predictions, compared by
    equality), ``"classes"`` (``[N, classes]`` scores: agreement, accuracy) or ``"values"``
    (anything else: output SQNR)."""
    if is_discrete(ref):
        return "discrete"
    return "classes" if ref.dim() == 2 and ref.shape[1] > 1 else "values"


def predictions(out: torch.Tensor) -> torch.Tensor:
    """The predictions of an output: itself if discrete, else the arg-max over dim 1."""
    return out if is_discrete(out) else as_rows(out).argmax(1)


def _finite_samples(t: Any, n: int) -> torch.Tensor:
    """``[n]`` bool: which samples of ``t`` are finite (all of them, or none, when ``t`` has no
    per-sample first dimension, is sparse or is not a float tensor)."""
    if isinstance(t, (tuple, list)):
        ok = torch.ones(n, dtype=torch.bool)
        for x in t:
            ok &= _finite_samples(x, n)
        return ok
    if isinstance(t, dict):
        return _finite_samples(list(t.values()), n)
    if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
        return torch.ones(n, dtype=torch.bool)
    if t.layout != torch.strided:  # sparse: all or none
        v = t.coalesce().values() if t.layout == torch.sparse_coo else t.values()
        return torch.full((n,), bool(torch.isfinite(v).all()))
    if t.dim() > 0 and t.shape[0] == n:
        return torch.isfinite(t.detach()).reshape(n, -1).all(1).cpu()
    return torch.full((n,), bool(torch.isfinite(t.detach()).all()))


@dataclass
class Pair:
    """One batch's comparison (see the module docstring): sums over its scored samples."""

    samples: float  # samples scored
    agree: float  # samples' worth of equal predictions
    kl: float  # Σ per-sample KL (0 for discrete outputs)
    signal: float  # Σ f²
    noise: float  # Σ (f - q)²
    hits: torch.Tensor  # per scored prediction row: equal to the float model's
    keep: torch.Tensor  # [n] bool: the batch's samples that are scored
    f: torch.Tensor  # the scored part of the float output
    q: torch.Tensor  # the scored part of the quantized output
    q_ok: torch.Tensor  # per row of ``as_rows(f)``: the quantized row is finite
    bad_input: int = 0  # samples left out: a non-finite input
    bad_float: int = 0  # samples left out: a non-finite float output (input finite)
    bad_quant: int = 0  # scored samples where only the quantized output is non-finite
    #: per scored sample (one entry for the batch when the output has no per-sample dim): its
    #: KL (mean over its prediction rows) and its squared output error; for an integer output
    #: both are its share of changed elements. What tune's paired decision reads.
    sample_kl: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    sample_err: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    cost: float = 0.0  # samples' worth of expected top-1 cost (integer outputs: changed share)


def _probabilities(rows: torch.Tensor) -> torch.Tensor:
    """Class probabilities per row (float64): the rows themselves if each is a distribution
    (entries in [0, 1] summing to 1 ± 1e-3: a softmax output), else their softmax."""
    r = rows.double()
    if r.numel() and bool(((r >= 0) & (r <= 1)).all()) and bool(
        ((r.sum(1) - 1).abs() < 1e-3).all()
    ):
        return r
    return torch.softmax(r, 1)


def expected_cost(rf: torch.Tensor, rq: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Per row: ``p(ĉ_f) - p(ĉ_q)``; ``p(ĉ_f)`` where the quantized row is not ``ok``."""
    p = _probabilities(rf)
    top = p.gather(1, rf.argmax(1, keepdim=True)).squeeze(1)
    theirs = p.gather(1, rq.nan_to_num(nan=-math.inf).argmax(1, keepdim=True)).squeeze(1)
    return torch.where(ok, top - theirs, top).clamp(min=0.0)


def compare(f: torch.Tensor, q: torch.Tensor, n: int, inputs: Any = None) -> Pair:
    """Compare one batch of ``n`` samples: the float reference ``f``, the quantized ``q`` (same
    shape and kind, as :func:`select` returns them) and the batch's ``inputs`` (any nest of
    tensors, checked for non-finite values)."""
    per = f.dim() > 0 and f.shape[0] == n
    disc = is_discrete(f)

    def finite(out: torch.Tensor) -> torch.Tensor:
        if disc:
            return torch.ones(n, dtype=torch.bool)
        if per and out.numel():
            return torch.isfinite(out).reshape(n, -1).all(1)
        return torch.full((n,), bool(torch.isfinite(out).all()))

    in_ok, f_ok, q_ok = _finite_samples(inputs, n), finite(f), finite(q)
    keep = in_ok & f_ok
    bad = {"bad_input": int((~in_ok).sum()), "bad_float": int((in_ok & ~f_ok).sum())}
    bad["bad_quant"] = int((keep & ~q_ok).sum())
    if per:
        f, q = f[keep], q[keep]
    elif not bool(keep.all()):  # no per-sample dim: the whole batch is left out
        f, q = f.reshape(1, -1)[:0], q.reshape(1, -1)[:0]
    ns = float(keep.sum())
    if disc:
        hits = (f == q).reshape(-1)
        agree = float(hits.sum()) * ns / hits.numel() if hits.numel() else 0.0
        ok = torch.ones(hits.shape, dtype=torch.bool)
        miss = _per_sample((~hits).double(), int(ns), per, mean=True)
        return Pair(ns, agree, 0.0, math.nan, math.nan, hits, keep, f, q, ok, **bad,
                    sample_kl=miss, sample_err=miss, cost=ns - agree)
    rf, rq = as_rows(f), as_rows(q)
    rows = rf.shape[0]
    ok = torch.isfinite(rq).all(1)
    hits = (rf.argmax(1) == rq.argmax(1)) & ok
    w = ns / rows if rows else 0.0
    logp, logq = F.log_softmax(rf.double(), 1), F.log_softmax(rq.double(), 1)
    kl_rows = (logp.exp() * (logp - logq)).sum(1).clamp(min=0.0)
    kl = float(kl_rows[ok].sum()) * w + (math.inf if not bool(ok.all()) else 0.0)
    err = (f.double() - q.double()).pow(2)
    noise = float(err.nan_to_num(nan=math.inf).sum())
    signal = float(f.double().pow(2).sum())
    sample_kl = _per_sample(kl_rows.masked_fill(~ok, math.inf), int(ns), per, mean=True)
    sample_err = _per_sample(err.nan_to_num(nan=math.inf), int(ns), per, mean=False)
    cost = float(expected_cost(rf, rq, ok).sum()) * w if rows else 0.0
    return Pair(ns, float(hits.sum()) * w, kl, signal, noise, hits, keep, f, q, ok, **bad,
                sample_kl=sample_kl, sample_err=sample_err, cost=cost)


def _per_sample(values: torch.Tensor, ns: int, per: bool, mean: bool) -> torch.Tensor:
    """``values`` (rows or elements of the scored samples) reduced to one number per sample
    (mean or sum), or to one for the whole batch when the output has no per-sample dim."""
    v = values.double().reshape(-1)
    if v.numel() == 0:
        return v
    rows = v.reshape(ns, -1) if per and ns and v.numel() % ns == 0 else v.reshape(1, -1)
    return (rows.mean(1) if mean else rows.sum(1)).cpu()


def take(target: Any, keep: torch.Tensor) -> Any:
    """The labels of the scored samples (``target`` as is when it has no per-sample dim)."""
    n = keep.numel()
    if bool(keep.all()):
        return target
    if isinstance(target, torch.Tensor) and target.dim() > 0 and target.shape[0] == n:
        return target[keep.to(target.device)]
    if isinstance(target, (list, tuple)) and len(target) == n:
        return type(target)(t for t, k in zip(target, keep.tolist()) if k)
    return target


def nonfinite_message(bad_input: int, bad_float: int, bad_quant: int, samples: int) -> str | None:
    """The warning for non-finite values met while scoring ``samples`` samples, or ``None``."""
    parts = []
    if bad_input:
        parts.append(
            f"{bad_input} sample(s) have NaN/Inf in their input and were left out of every score"
        )
    if bad_float:
        parts.append(
            f"the float model itself returns NaN/Inf on {bad_float} sample(s) with finite input "
            "(before any quantization: check its parameters and inputs); they were left out of "
            "every score"
        )
    if bad_quant:
        parts.append(
            f"the quantized model returns NaN/Inf on {bad_quant} sample(s) where the float model "
            "is finite: counted as wrong predictions, KL and noise infinite"
        )
    if not parts:
        return None
    return "non-finite values: " + "; ".join(parts) + f" ({samples} sample(s) scored)"


def db_ratio(signal: float, noise: float) -> float:
    """``10·log10(signal / noise)`` dB (``inf`` without noise, ``nan`` when undefined)."""
    if math.isnan(signal) or math.isnan(noise):
        return math.nan
    if noise <= 0:
        return math.inf
    if signal <= 0 or math.isinf(noise):
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def nonfinite_outputs(out: Any, path: str = "output") -> list[str]:
    """``"output[0]: 32 of 32 rows"`` for every float tensor of a (nested) model output that
    holds NaN/Inf (rows: the first dimension's entries with a non-finite value)."""
    if isinstance(out, torch.Tensor):
        if not (out.is_floating_point() or out.is_complex()) or out.layout != torch.strided:
            return []
        bad = ~torch.isfinite(out.detach())
        if not bool(bad.any()):
            return []
        if out.dim() == 0:
            return [f"{path}: {out.item()}"]
        rows = int(bad.reshape(out.shape[0], -1).any(1).sum())
        return [f"{path}: {rows} of {out.shape[0]} rows"]
    if isinstance(out, Mapping):
        items: list[tuple[Any, Any]] = list(out.items())
    elif isinstance(out, (tuple, list)):
        items = list(enumerate(out))
    elif hasattr(out, "to_tuple"):  # a transformers ModelOutput
        items = list(enumerate(out.to_tuple()))
    else:
        return []
    return [m for k, v in items for m in nonfinite_outputs(v, f"{path}[{k!r}]")]
