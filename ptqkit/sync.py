"""Keeping the ranks of a ``torch.distributed`` job in step in the data-driven stages.

Under ``torchrun``, every rank runs :func:`ptqkit.quantize` on the same model and config with its
own shard of the data. Calibration merges its statistics (:mod:`ptqkit.calibrate.distributed`);
the later stages that read data use the helpers below, so that every rank ends with the same
model:

* statistics that are sums (bias correction's per-channel sums and counts, ``auto``'s error sums,
  the fallback's agreement counts and signal/noise energies) are **summed over the ranks** with
  :func:`add_up`: every rank receives every rank's partial sums and adds them **in rank order**,
  so the totals are bit-identical on every rank and do not depend on which rank finished first
  (unlike an ``all_reduce``, whose summation order is the backend's);
* results that are learned (AdaRound's rounding) are computed **once** and sent to every rank with
  :func:`from_first`.

Every exchange is one :func:`exchange`: each rank sends ``{tag, error, value}``; the values come
back in rank order. A rank whose local work raised sends its error instead of a value, and then
**every** rank raises (the failing rank its own error, the others a :class:`DistributedError`
naming the failed rank and its message), so nobody is left waiting in a collective. Ranks at
different sync points (``tag``) raise as well. Values cross ranks with ``torch.save`` and are
read back with ``weights_only=True`` (tensors, numbers, strings, ``None``, lists, tuples, dicts):
nothing received from a peer runs as code. Collectives wait at most the process group's timeout.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import DistributedError

T = TypeVar("T")

#: attribute set on an exception every rank already knows about (no second exchange for it)
_SHARED = "_ptqkit_shared"


def active() -> bool:
    """``True`` when a default process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside ``torch.distributed``)."""
    return dist.get_rank() if active() else 0


def comm_device() -> torch.device:
    """Where collectives put their tensors: the current GPU for nccl, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _shared(e: BaseException) -> BaseException:
    setattr(e, _SHARED, True)
    return e


def all_gather_bytes(payload: bytes) -> list[bytes]:
    """Every rank's ``payload``, in rank order (two collectives: the sizes, then the bytes)."""
    dev, world = comm_device(), dist.get_world_size()
    local = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(dev)
    try:
        size = torch.tensor([local.numel()], dtype=torch.int64, device=dev)
        sizes = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        n = max(int(s) for s in sizes)
        padded = torch.zeros(n, dtype=torch.uint8, device=dev)
        padded[: local.numel()] = local
        out = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(out, padded)
    except Exception as e:  # a dead peer or a timeout: trying another exchange would wait again
        raise _shared(e) from None
    return [o[: int(s)].cpu().numpy().tobytes() for o, s in zip(out, sizes)]


def exchange(tag: str, value: Any, error: BaseException | None = None) -> list[Any]:
    """Every rank's ``value`` in rank order (see the module docstring). With ``error`` (what this
    rank raised), every rank raises instead."""
    msg = None if error is None else f"{type(error).__name__}: {error}"
    buf = io.BytesIO()
    torch.save({"tag": tag, "error": msg, "value": None if error is not None else value}, buf)
    got = [
        torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)
        for b in all_gather_bytes(buf.getvalue())
    ]
    failed = [r for r, g in enumerate(got) if g["error"] is not None]
    if failed:
        if error is not None:
            raise _shared(error)
        detail = "; ".join(f"rank {r}, in {got[r]['tag']}: {got[r]['error']}" for r in failed)
        raise _shared(
            DistributedError(f"rank(s) {failed} failed ({detail}); every rank stops at {tag!r}")
        )
    tags = [g["tag"] for g in got]
    if any(t != tag for t in tags):
        raise _shared(
            DistributedError(
                f"the ranks are out of step (rank r at: {dict(enumerate(tags))}): every rank "
                "must run ptqkit.quantize with the same model and PTQConfig"
            )
        )
    return [g["value"] for g in got]


@contextmanager
def guard(stage: str) -> Iterator[None]:
    """Within the block, an exception on this rank is shared with the others (they raise a
    :class:`DistributedError` at their next exchange) before it propagates."""
    try:
        yield
    except Exception as e:
        if active() and not getattr(e, _SHARED, False):
            exchange(stage, None, e)  # raises e
        raise


def add_up(tag: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (tensors or numbers; ``None`` for "nothing here") summed over the ranks in rank
    order, identical on every rank; a key is ``None`` where every rank had ``None``. Tensors
    come back on the device of this rank's tensor (CPU when this rank had ``None``)."""
    if not active():
        return dict(values)
    rows = exchange(tag, values)
    out: dict[str, Any] = {}
    for k, mine in values.items():
        total = None
        for row in rows:
            v = row[k]
            if v is not None:
                total = v if total is None else total + v
        if isinstance(total, torch.Tensor) and isinstance(mine, torch.Tensor):
            total = total.to(mine.device)
        out[k] = total
    return out


def from_first(tag: str, fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 only and its result sent to every rank (an error in it raises on
    every rank). Outside ``torch.distributed``, just ``fn()``."""
    if not active():
        return fn()
    value, error = None, None
    if dist.get_rank() == 0:
        try:
            value = fn()
        except Exception as e:
            error = e
    return exchange(tag, value, error)[0]


def empty_shard(data: Any) -> bool:
    """Under ``torch.distributed``, whether this rank's shard has no batch at all (allowed: the
    rank then contributes nothing to the sums; a stage skips its own pass over the data, which
    would raise on empty data). Costs one ``iter()`` and at most one batch."""
    if not active() or isinstance(data, (torch.Tensor, dict)) or data is None:
        return False
    try:
        return next(iter(data), _END) is _END
    except TypeError:
        return False  # not iterable: the stage's own pass says so


_END = object()


def from_data(tag: str, value: T, has_data: bool) -> T:
    """The ``value`` of the lowest rank whose shard had data (rank 0's when none had): e.g. the
    execution order of the layers of an untraced model, read off a batch."""
    if not active():
        return value
    rows = exchange(tag, (value, has_data))
    return next((v for v, had in rows if had), rows[0][0])


__all__ = [
    "active",
    "add_up",
    "all_gather_bytes",
    "comm_device",
    "empty_shard",
    "exchange",
    "from_data",
    "from_first",
    "guard",
    "rank",
]
