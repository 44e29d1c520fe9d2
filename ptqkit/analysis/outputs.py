"""Which tensor of a model's output :func:`ptqkit.evaluate` scores, and how.

A model may return a tensor, a tuple/list, a dict (or a ``ModelOutput`` with a ``logits``
attribute). Without an ``output=`` selector the scored tensor is:

* a tensor: itself;
* a dict-like output: its ``"logits"`` entry (key or attribute), else its only tensor value;
* a tuple/list: its only tensor item (e.g. ``(logits, past_key_values)`` or ``(logits, None)``).

Anything else (two tensors and none called ``logits``) is ambiguous: guessing would score the
wrong tensor and report a number that means nothing, so a :class:`~ptqkit.DataError` lists the
entries and says how to choose (``output="key"``, ``output=index`` or ``output=callable``).

Integer and bool outputs (an ``argmax``, a mask) are predictions, not scores: they are compared
by equality, never through ``argmax``/``softmax`` (an argmax of a ``[N]`` label vector seen as one
column is always 0, which would report 100 % agreement whatever the labels).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import DataError

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


def _ambiguous(out: Any, who: str) -> DataError:
    listed = ", ".join(f"{k!r}: {_describe(v)}" for k, v in _entries(out))
    kind = "dict" if isinstance(out, Mapping) else type(out).__name__
    example = next(iter(k for k, _ in _entries(out)), 0)
    return DataError(
        f"the {who} model returned a {kind} with no obvious tensor to score ({listed}); choose "
        f"one with evaluate(..., output={example!r}) (a key or an index) or "
        "output=lambda out: ... (a callable returning the tensor of scores)"
    )


def select(out: Any, output: OutputSelector, who: str) -> torch.Tensor:
    """The tensor to score in ``out`` (see the module docstring), detached, on the CPU, with
    its dtype (float outputs are converted to float32, integer and bool ones kept)."""
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
                raise _ambiguous(out, who)
            out = tensors[0]
    elif isinstance(out, (tuple, list)):
        tensors = [v for v in out if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise _ambiguous(out, who)
        out = tensors[0]
    if not isinstance(out, torch.Tensor) and hasattr(out, "__array__"):
        out = torch.as_tensor(out)
    if not isinstance(out, torch.Tensor):
        raise DataError(
            f"the {who} model returned a {type(out).__name__}, not a tensor of scores; choose "
            "the tensor with evaluate(..., output=...)"
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


def topk_hits(logits: torch.Tensor, target: Any, k: int) -> float:
    """Number of rows whose target is among the ``k`` highest scores."""
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
    top = logits.topk(k, dim=1).indices
    return float((top == t[:, None]).any(dim=1).sum())
