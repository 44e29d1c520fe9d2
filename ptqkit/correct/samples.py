"""The rows layer-wise reconstruction (AdaRound) optimizes on: for each layer, sampled output
positions ``p`` with the float network's output ``y[p]`` (the target) and the input patch
``x̂[p]`` of the partially quantized network (earlier layers already rounded).

Row sampling, per layer: from each batch where the layer runs (its first call), at most
``rows_per_batch`` positions drawn without replacement by a ``torch.Generator`` seeded with the
layer's seed, until ``max_rows`` are kept; the same rows whichever way the inputs are obtained.

* :func:`float_targets`: one float pass over the batches, keeping every layer's sampled target
  rows (memory: ``max_rows × channels`` per layer) and the batches they come from.
* :func:`input_rows`: the matching ``x̂`` patches, from a layer's cached inputs during
  :func:`ptqkit.walk.propagate` (one quantized pass in all).
* :func:`collect_prefix`: both, for one layer, by running the prefix of the network twice
  (a model that could not be traced).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import AdaRoundOptions, PTQConfig
from ..data import Batch
from ..quant.modules import QuantLayer, float_mode
from ..walk import batches, run_until, stop_after
from .patches import patches, rows_of


@dataclass
class Rows:
    """One layer's sampled rows: per batch used, ``(batch index, rows, rows per image)``, and
    the float targets at those rows."""

    seed: int
    picks: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    kept: int = 0

    def __post_init__(self) -> None:
        self.gen = torch.Generator().manual_seed(self.seed)

    def full(self, opts: AdaRoundOptions) -> bool:
        return self.kept >= opts.max_rows

    def sample(self, y: torch.Tensor, linear: bool, opts: AdaRoundOptions) -> tuple[Any, int]:
        """Draw this batch's rows of output ``y``; returns ``(rows, rows per image)``."""
        flat, per_image = rows_of(y, linear)
        take = min(flat.shape[0], opts.rows_per_batch, opts.max_rows - self.kept)
        rows = torch.randperm(flat.shape[0], generator=self.gen)[:take].sort().values
        rows = rows.to(y.device)
        self.targets.append(flat[rows].float())
        self.kept += take
        return rows, per_image

    def target(self) -> torch.Tensor:
        return torch.cat(self.targets)


def _x_rows(layer: QuantLayer, x: torch.Tensor, rows: torch.Tensor, per_image: int) -> Any:
    if layer.input_quant is not None:
        x = layer.input_quant(x)
    if isinstance(layer.layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])[rows].unsqueeze(1)
    return patches(layer.layer, x, rows, per_image)


def float_targets(
    qmodel: nn.Module,
    data: Iterable[Any],
    config: PTQConfig,
    seeds: dict[str, int],
    layers: dict[str, QuantLayer],
) -> tuple[dict[str, Rows], list[Batch]]:
    """One float pass: each layer's sampled target rows (``seeds``: the layers and their
    seeds), and the batches up to the last one any layer took rows from."""
    opts = config.adaround_options
    plans = {n: Rows(s) for n, s in seeds.items()}
    ran: set[str] = set()

    def hook(name: str) -> Callable[..., None]:
        def record(m: nn.Module, a: Any, y: torch.Tensor) -> None:
            plan = plans[name]
            if name in ran or plan.full(opts):
                return
            ran.add(name)
            rows, per_image = plan.sample(y.detach(), isinstance(m.layer, nn.Linear), opts)
            plan.picks.append((index, rows, per_image))

        return record

    feeds: list[Batch] = []
    used = 0
    hooks = [layers[n].register_forward_hook(hook(n)) for n in plans]
    try:
        with torch.no_grad(), float_mode(qmodel):
            for index, (i, args, kwargs) in enumerate(batches(data, config, qmodel)):
                ran.clear()
                run_until(qmodel, args, kwargs, i)
                feeds.append((args, kwargs))
                if ran:
                    used = index + 1
                if all(p.full(opts) for p in plans.values()):
                    break
    finally:
        for h in hooks:
            h.remove()
    return plans, feeds[:used]


def input_rows(layer: QuantLayer, plan: Rows, inputs: Callable[[], Iterator[Batch]]) -> Any:
    """The ``x̂`` rows of ``plan`` from the layer's cached inputs (``inputs()``: per batch)."""
    picks = {b: (rows, per) for b, rows, per in plan.picks}
    xs = []
    for b, (args, _) in enumerate(inputs()):
        if b in picks:
            xs.append(_x_rows(layer, args[0].detach(), *picks[b]))
    return torch.cat(xs).float()


def collect_prefix(
    qmodel: nn.Module, layer: QuantLayer, data: Iterable[Any], config: PTQConfig, seed: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(x̂ rows, float targets)`` for one layer, running the prefix of the network up to it
    twice per batch (float, then as it is)."""
    opts = config.adaround_options
    plan = Rows(seed)
    xs = []
    box: dict[str, torch.Tensor] = {}
    out_hook = lambda m, a, y: box.__setitem__("y", y.detach())  # noqa: E731
    in_hook = lambda m, a: box.__setitem__("x", a[0].detach())  # noqa: E731
    for i, args, kwargs in batches(data, config, qmodel):
        box.clear()
        h = layer.register_forward_hook(out_hook)
        try:
            with torch.no_grad(), float_mode(qmodel), stop_after(layer):
                run_until(qmodel, args, kwargs, i)
        finally:
            h.remove()
        if "y" not in box:
            continue
        h = layer.register_forward_pre_hook(in_hook)
        try:
            with torch.no_grad(), stop_after(layer):
                run_until(qmodel, args, kwargs, i)
        finally:
            h.remove()
        rows, per_image = plan.sample(box["y"], isinstance(layer.layer, nn.Linear), opts)
        with torch.no_grad():
            xs.append(_x_rows(layer, box["x"], rows, per_image))
        if plan.full(opts):
            break
    if not xs:
        return None
    return torch.cat(xs).float(), plan.target()


__all__ = ["Rows", "collect_prefix", "float_targets", "input_rows"]
