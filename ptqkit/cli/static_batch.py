"""A ``torch.export`` program exported with a static batch size (``torch.export.export`` without
``dynamic_shapes``) runs only on batches of that size: any other size fails deep inside with
``Guard failed: x.size()[0] == 4``. The CLI detects it once, up front (:func:`static_batch_size`),
and then uses that size everywhere: the arrays and images it batches itself are re-batched to it
(:func:`fit_batches`, the incomplete last batch dropped and said so), batches from a user's
loader are checked (a batch of another size is a usage error naming it and saying how to export
with a dynamic batch), and the example input of the export and latency has that size.
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from typing import Any

from .inputs_data import batched

#: how to export a program that accepts any batch size (shown in the errors)
DYNAMIC_HINT = (
    "export it with a dynamic batch instead: torch.export.export(model, (x,), "
    "dynamic_shapes={'x': {0: torch.export.Dim.DYNAMIC}}) (name the forward argument)"
)


def static_batch_size(model: Any) -> int | None:
    """The batch size of a ``torch.export`` program whose inputs all have the same static first
    dimension; ``None`` for a dynamic batch, a model that is not an exported graph, or inputs
    that disagree."""
    graph = getattr(model, "graph", None)
    if graph is None:
        return None
    sizes = set()
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        shape = getattr(node.meta.get("val"), "shape", None)
        if shape is None or len(shape) == 0:
            continue
        if not isinstance(shape[0], int):
            return None  # a SymInt: the batch is dynamic
        sizes.add(int(shape[0]))
    return sizes.pop() if len(sizes) == 1 else None


def fit_batches(
    data: Any, size: int, flag: str, error: Callable[[str], Exception], note: Callable[[str], None]
) -> Any:
    """``data`` (an :class:`~.inputs_data.Data`) with batches of exactly ``size`` samples.

    Arrays and images (``data.arrays`` set) are re-batched, dropping the last incomplete batch
    (``note`` says how many samples); other batches are checked, and the first of another size
    raises ``error(message)``."""
    import dataclasses

    from ..data import split_batch

    if data.arrays is not None:
        x, y = data.arrays
        n = len(x) // size * size
        if n == 0:
            raise error(
                f"{flag}: {len(x)} samples, fewer than the static batch of {size} the model was "
                f"exported with; give at least {size} samples, or {DYNAMIC_HINT}"
            )
        if n < len(x):
            note(
                f"{flag}: {len(x) - n} of {len(x)} samples dropped to make batches of {size} "
                "(the model's static batch)"
            )
        batches = batched(x[:n], None if y is None else y[:n], size)
        desc = f"{data.description}, {n} of them in batches of {size}"
        return dataclasses.replace(data, batches=batches, description=desc)
    for i, batch in enumerate(data.batches):
        args, kwargs = split_batch(batch, i)
        first = next(iter((*args, *kwargs.values())), None)
        got = len(first) if isinstance(first, Sized) else None
        if got != size:
            raise error(
                f"{flag}: batch {i} has {got} samples, but the model was exported with a static "
                f"batch of {size}; give batches of {size}, or {DYNAMIC_HINT}"
            )
    return data
