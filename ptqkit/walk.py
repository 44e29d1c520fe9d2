"""Walking the model over the calibration data: the low-level helpers every data-driven stage
shares (bias correction, AdaRound, ``"auto"`` calibration, sensitivity, fallback).

* :func:`batches`: the calibration batches on the model's device, optionally only the first
  ``max_samples`` samples.
* :func:`layer_order`: the :class:`QuantLayer` modules in the order they first run.
* :func:`stop_after` / :func:`run_until`: run the model only up to one layer.
* :func:`propagate`: the cached-layer-input engine. Instead of re-running the network prefix for
  every layer (``O(depth²)`` forward work), it executes a traced graph *node by node over all the
  batches at once* ("layer-wise propagation" of cached inputs, as in AIMET's and BRECQ's
  per-layer reconstruction), calling a stage back right before each quantized layer runs; the
  stage may change that layer (its bias, its rounding), and the layer then runs on every batch
  with the change, so everything downstream sees it. Forward work: one pass, plus what the
  stages do at each layer. Only the values still needed later are kept; once they exceed a
  memory budget, further ones are spilled to a temporary directory on disk.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeGuard

import torch
from torch import fx, nn

from .config import PTQConfig
from .data import Batch, batch_size, iter_batches, model_device, run_model, to_device
from .errors import ModelError
from .quant.modules import QuantLayer, float_mode, quant_layers

#: in-memory budget of the propagation engine's cached values (bytes) before spilling to disk
MEMORY_BUDGET = 2 << 30


# -- running part of the model -------------------------------------------------------------------
class StopForward(BaseException):  # not an Exception: run_model must not wrap it
    """Raised by a hook to end a forward pass early (nothing after the hooked layer runs)."""


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Within the block, a forward pass raises :class:`StopForward` right after ``module`` ran
    (hooks registered on it earlier still see its output)."""

    def hook(*_: Any) -> None:
        raise StopForward

    h = module.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def run_until(model: nn.Module, args: tuple, kwargs: dict, index: int) -> None:
    """Run one batch, tolerating an early :class:`StopForward`."""
    with suppress(StopForward):
        run_model(model, index, args, kwargs)


def batches(
    data: Iterable[Any], config: PTQConfig, model: nn.Module, max_samples: int | None = None
) -> Iterator[tuple]:
    """``(index, args, kwargs)`` of the calibration batches, on the model's device; with
    ``max_samples``, the batches stop once that many samples have been yielded."""
    device = model_device(model)
    seen = 0
    for i, (args, kwargs) in iter_batches(data, config.num_batches):
        if max_samples is not None and seen >= max_samples:
            break
        args, kwargs = to_device(args, kwargs, device)
        seen += batch_size(args, kwargs)
        yield i, args, kwargs


def layer_order(model: nn.Module, data: Iterable[Any], config: PTQConfig) -> list[str]:
    """Names of the :class:`QuantLayer` modules in the order they first run (on one batch;
    read off the graph, without running it, when every layer is a node of a traced graph)."""
    layers = quant_layers(model)
    if can_propagate(model):
        graph = model.graph.nodes
        called = [str(n.target) for n in graph if n.op == "call_module" and n.target in layers]
        return list(dict.fromkeys(called))
    order: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda *_, n=n: order.append(n) if n not in order else None)
        for n, m in layers.items()
    ]
    try:
        with torch.no_grad(), float_mode(model):
            for i, args, kwargs in batches(data, config, model):
                run_model(model, i, args, kwargs)
                break
    finally:
        for h in hooks:
            h.remove()
    return order + [n for n in layers if n not in order]  # never run: last


# -- the cached-layer-input engine ----------------------------------------------------------------
def can_propagate(
    model: nn.Module, layers: Iterable[str] | None = None
) -> TypeGuard[fx.GraphModule]:
    """Whether :func:`propagate` can run ``model``: a ``GraphModule`` with the plain code
    generator (its placeholders are its ``forward`` arguments, no ``*args``/``**kwargs``) in
    which each of ``layers`` is called as a node of the graph (not hidden inside a leaf)."""
    if not isinstance(model, fx.GraphModule) or type(model.graph._codegen) is not fx.graph.CodeGen:
        return False
    nodes = list(model.graph.nodes)
    if any(n.op == "placeholder" and str(n.target).startswith("*") for n in nodes):
        return False
    called = {n.target for n in nodes if n.op == "call_module"}
    return all(n in called for n in (quant_layers(model) if layers is None else layers))


class _Spilled:
    def __init__(self, path: str) -> None:
        self.path = path


class _Store:
    """Per node, its value on each batch: in memory up to ``budget`` bytes, then on disk."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0
        self.values: dict[fx.Node, list[Any]] = {}
        self.dir: str | None = None
        self.count = 0
        self.spilled = 0

    def _keep(self, v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        size = v.numel() * v.element_size()
        if self.used + size <= self.budget:
            self.used += size
            return v
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="ptqkit-walk-")
        path = os.path.join(self.dir, f"{self.count}.pt")
        self.count += 1
        torch.save(v, path)
        self.spilled += 1
        return _Spilled(path)

    def _drop(self, v: Any) -> None:
        if isinstance(v, _Spilled):
            with suppress(OSError):
                os.remove(v.path)
        elif isinstance(v, torch.Tensor):
            self.used -= v.numel() * v.element_size()

    def put(self, node: fx.Node, values: Iterable[Any]) -> None:
        """Store ``values`` (one per batch; an iterator is consumed one value at a time)."""
        self.values[node] = []
        for v in values:
            self.values[node].append(self._keep(v))

    def update(self, node: fx.Node, fn: Callable[[Any], Any]) -> None:
        """Replace the node's value ``v`` on each batch by ``fn(v)``, one batch at a time."""
        vals = self.values[node]
        for b in range(len(vals)):
            new = fn(self.get(node, b))
            self._drop(vals[b])
            vals[b] = self._keep(new)

    def get(self, node: fx.Node, b: int) -> Any:
        v = self.values[node][b]
        return torch.load(v.path, weights_only=True) if isinstance(v, _Spilled) else v

    def free(self, node: fx.Node) -> None:
        for v in self.values.pop(node, []):
            self._drop(v)

    def close(self) -> None:
        self.values.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def placeholder_values(gm: fx.GraphModule, feeds: list[Batch]) -> dict[fx.Node, list[Any]]:
    """Each placeholder's value on each batch of ``feeds`` (its default where not passed)."""
    sig = inspect.signature(gm.forward)
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out: dict[fx.Node, list[Any]] = {n: [] for n in holders}
    for args, kwargs in feeds:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        for n in holders:
            out[n].append(bound.arguments.get(str(n.target), n.args[0] if n.args else None))
    return out


class Rerun:
    """Returned by a visit: the layer changed (its weights), run it again on every batch."""


#: what a visit may return: ``None`` (keep the outputs), :data:`RERUN`, or a function applied to
#: the layer's output on each batch (e.g. adding a bias shift, without running it again)
RERUN = Rerun()

#: ``visit(name, layer, inputs, outputs)``: called right after the first call of layer ``name``
#: ran on every batch; ``inputs()`` / ``outputs()`` yield that call's ``(args, kwargs)`` and
#: output on each batch, in order
Visit = Callable[
    [str, QuantLayer, Callable[[], Iterator[Batch]], Callable[[], Iterator[Any]]],
    "Rerun | Callable[[Any], Any] | None",
]


def propagate(
    gm: fx.GraphModule,
    feeds: list[Batch],
    visit: Visit,
    layers: Iterable[str] | None = None,
    budget: int = MEMORY_BUDGET,
) -> dict[str, Any]:
    """Run ``gm`` node by node on all the batches ``feeds`` (``(args, kwargs)`` each), calling
    ``visit`` right after the first call of each layer in ``layers`` (default: every
    :class:`QuantLayer`) ran on all of them, before any later node runs; what it returns
    (:data:`Visit`) decides the outputs the later nodes see. The graph is run only up to the
    last of the layers. Works under the caller's grad / float mode. Returns what it did:
    layers visited, batches, values spilled to disk.
    """
    if not can_propagate(gm):
        raise TypeError("propagate needs a GraphModule with plain placeholders (can_propagate)")
    wanted = set(quant_layers(gm) if layers is None else layers)
    nodes = list(gm.graph.nodes)
    calls = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target in wanted]
    end = calls[-1] if calls else -1
    last_use: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last_use[a] = i
    interp = fx.Interpreter(gm)
    store = _Store(budget)
    seen: list[str] = []
    try:
        for n, vals in placeholder_values(gm, feeds).items():
            store.put(n, vals)
            if n not in last_use:
                store.free(n)
        for i, node in enumerate(nodes[: end + 1]):
            if node.op == "placeholder":
                continue

            def inputs(node: fx.Node = node) -> Iterator[Batch]:
                for b in range(len(feeds)):

                    def load(arg: fx.Node, b: int = b) -> Any:
                        return store.get(arg, b)

                    yield fx.node.map_arg(node.args, load), fx.node.map_arg(node.kwargs, load)

            run = getattr(interp, node.op)
            store.put(node, (run(node.target, a, k) for a, k in inputs()))
            if node.op == "call_module" and node.target in wanted and node.target not in seen:
                seen.append(str(node.target))
                layer = gm.get_submodule(str(node.target))
                if not isinstance(layer, QuantLayer):
                    raise ModelError(f"propagate: {node.target} is not a QuantLayer")

                def outputs(node: fx.Node = node) -> Iterator[Any]:
                    return (store.get(node, b) for b in range(len(feeds)))

                change = visit(str(node.target), layer, inputs, outputs)
                if isinstance(change, Rerun):  # RERUN
                    store.free(node)
                    store.put(node, (run(node.target, a, k) for a, k in inputs()))
                elif change is not None:
                    store.update(node, change)
            for a in node.all_input_nodes:
                if last_use.get(a) == i:
                    store.free(a)
            if node not in last_use:
                store.free(node)
        return {"layers": len(seen), "batches": len(feeds), "spilled": store.spilled}
    finally:
        store.close()


__all__ = [
    "MEMORY_BUDGET",
    "RERUN",
    "Rerun",
    "StopForward",
    "Visit",
    "batches",
    "can_propagate",
    "layer_order",
    "placeholder_values",
    "propagate",
    "run_until",
    "stop_after",
]
