"""Per-output-channel means of the quantized layers' outputs: what empirical bias correction
compares (``E[y]`` of the float network against ``E[ỹ]`` of the quantized one).

:class:`FloatMeans` is a *tap* on the calibration pass: the float outputs it needs flow through
the model during calibration anyway, so bias correction does not run a float pass of its own.
It keeps the first ``samples`` samples only (the batches :func:`ptqkit.walk.batches` would
yield with ``max_samples=samples``), i.e. exactly the means a separate float pass would take,
and those batches themselves (``feeds``): the quantized pass of bias correction runs on them, so
it never iterates the user's data again (a one-shot iterator serves it). With ``rows > 0`` it also
keeps each layer's float output at a few sampled positions of every recorded batch
(:func:`position_rows`; ``rows`` per layer in all, at most ``rows × channels`` floats per layer):
the pairs the scale fit of ``bias_correction="affine"`` needs (:mod:`ptqkit.correct.affine`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data import Batch, batch_size
from ..quant.modules import quant_layers
from ..sync import active, add_up


def channel_sum(y: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, int]:
    """Per-output-channel sum of ``y`` (axis 1 for convs, last for Linear, in float64) and the
    count. A conv's positions are summed per image first, in (at least) float32 with pairwise
    summation (relative error ~1e-8; 20× faster than converting the whole map to float64)."""
    y = y.detach()
    if isinstance(layer, nn.Linear):
        flat = y.reshape(-1, y.shape[-1]).double()
        return flat.sum(0), flat.shape[0]
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    per_image = y.flatten(2).sum(2, dtype=acc)  # [N, C]
    return per_image.double().sum(0), y.shape[0] * y[0, 0].numel()


def position_rows(y: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``y`` as ``[N, positions, channels]``: a conv's output channels are on axis 1, a
    Linear's on the last axis (its positions: every other axis but the first)."""
    if isinstance(layer, nn.Linear):
        return y.reshape(y.shape[0], -1, y.shape[-1])
    return y.flatten(2).transpose(1, 2)


class Mean:
    """A running per-channel mean: a float64 sum and a count."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0
        self.calls = 0  # tensors added (calls of the layer seen)

    def add(self, y: torch.Tensor, layer: nn.Module) -> None:
        s, n = channel_sum(y, layer)
        self.total = s if self.total is None else self.total + s
        self.count += n
        self.calls += 1

    @property
    def value(self) -> torch.Tensor | None:
        return None if self.total is None else self.total / max(self.count, 1)


def left_out(info: Any) -> dict[int, set[int]]:
    """The calibration samples found to be outliers (:mod:`ptqkit.calibrate.watch`),
    ``{batch: {sample, ...}}``, from ``info.outliers``: bias correction leaves every one out,
    also those that ``minmax``/``ema`` keep in their ranges by definition (a corrupt sample of
    1e30 among 64 moves a layer's float mean by ~1e28: the correction it asks for is noise
    an output grid of that range rounds away, and a bias no other sample needs)."""
    out: dict[int, set[int]] = {}
    for o in getattr(info, "outliers", {}).values():
        if o.get("kind") == "sample":
            for b, s in o.get("samples", []):
                out.setdefault(int(b), set()).add(int(s))
    return out


def without_samples(batch: Batch, samples: set[int]) -> Batch | None:
    """``batch`` without the samples ``samples`` (rows of dim 0 of every top-level tensor whose
    first dimension is the batch's); ``None`` when none is left."""
    args, kwargs = batch
    n = batch_size(args, kwargs)
    keep = torch.tensor([i not in samples for i in range(n)])
    if bool(keep.all()):
        return batch
    if not bool(keep.any()):
        return None

    def cut(t: Any) -> Any:
        ok = isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n
        return t[keep.to(t.device)] if ok else t

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def over_ranks(tag: str, means: dict[str, Mean]) -> None:
    """Under ``torch.distributed``, every mean's sum and count summed over the ranks (in rank
    order: identical on every rank; a per-channel mean is a sum over a count, so this is the
    mean over the union of the shards)."""
    if not active():
        return
    parts: dict[str, Any] = {n: m.total for n, m in means.items()}
    parts.update({f"{n}#": m.count for n, m in means.items()})
    sums = add_up(tag, parts)
    for n, m in means.items():
        m.total, m.count = sums[n], int(sums[f"{n}#"])


class FloatMeans:
    """Context manager: while it is open, every forward of ``model`` adds each
    :class:`QuantLayer`'s output to that layer's :class:`Mean`, for the batches that start
    within the first ``samples`` samples. Open it around a pass in which the layers compute in
    float (the calibration pass); ``means`` holds the result."""

    def __init__(self, model: nn.Module, samples: int, rows: int = 0) -> None:
        self.model, self.samples, self.rows = model, samples, rows
        self.layers = quant_layers(model)
        self.index = {n: i for i, n in enumerate(self.layers)}  # seeds the row sampling
        self.means = {n: Mean() for n in self.layers}
        self.feeds: list[Batch] = []  # the recorded batches, on the model's device
        self.order: list[str] = []  # the layers in the order they first ran
        # per layer, per recorded batch (its first call there): the sampled positions and the
        # float output at them, [N, k, C]
        self.picks: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
        self.picks = {n: [] for n in self.layers}
        self.seen = 0
        self.recording = False
        self._hooks: list[Any] = []

    def _batch(self, _: nn.Module, args: tuple, kwargs: dict) -> None:
        self.recording = self.seen < self.samples
        self.seen += batch_size(args, kwargs)
        if self.recording:
            self.feeds.append((args, kwargs))

    def __enter__(self) -> FloatMeans:
        self._hooks.append(self.model.register_forward_pre_hook(self._batch, with_kwargs=True))
        for n, layer in self.layers.items():
            self._hooks.append(layer.register_forward_hook(self._recorder(n)))
        return self

    def _recorder(self, name: str) -> Any:
        def hook(m: nn.Module, _: Any, y: Any) -> None:
            if self.recording and isinstance(y, torch.Tensor):
                if self.means[name].total is None:
                    self.order.append(name)
                self.means[name].add(y, self.layers[name].layer)
                if self.rows and len(self.picks[name]) < len(self.feeds):
                    self.picks[name].append(self._pick(name, y))

        return hook

    def _pick(self, name: str, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``k = max(1, rows // samples)`` positions of this batch, the same for each of its
        images, drawn by a generator seeded with the layer's and the batch's index (the same
        rows on every run and rank)."""
        yr = position_rows(y.detach(), self.layers[name].layer)
        k = min(yr.shape[1], max(1, self.rows // self.samples))
        seed = self.index[name] * 100_003 + len(self.picks[name])
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(yr.shape[1], generator=gen)[:k].sort().values.to(y.device)
        return idx, yr[:, idx].float()

    def __exit__(self, *_: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


__all__ = [
    "FloatMeans",
    "Mean",
    "channel_sum",
    "left_out",
    "over_ranks",
    "position_rows",
    "without_samples",
]
