"""Calibration across processes with ``torch.distributed`` (gloo on CPU, nccl on GPUs).

Each rank runs :func:`ptqkit.quantize` on the same model and config with its own shard of the
calibration data; when a default process group with more than one rank is initialized (e.g. under
``torchrun --nproc_per_node N``), :func:`ptqkit.calibrate.session.calibrate` calls
:func:`observe_and_merge` instead of observing alone:

1. every rank observes its shard (an empty shard is allowed: that rank contributes nothing);
2. :func:`agree`: one small ``all_gather`` of a header per rank — stage, a hash of the quantizer
   names, calibrator types and config, a checksum of the weights, whether the rank failed, and
   its batch/sample counts. A failed rank, or ranks whose models or configs differ, raise a
   :class:`CalibrationError` on **every** rank (naming the ranks and, for models, the quantizers
   that differ) instead of leaving the others waiting in a collective;
3. :func:`merge_calibrators`: the calibrators' states are serialized, ``all_gather``-ed, and every
   rank merges them in rank order with ``Calibrator.merge``. Every rank ends with the same
   calibrators, equal to those of one process that saw the shards one after another: min/max
   and histograms merge exactly (ranges identical to one process over all the data); ``ema`` is
   order-dependent and equals one process that saw rank 0's shard, then rank 1's, ...

The states are exchanged with pickle (``torch.save``/``torch.load``): the peers are the ranks of
the same job, the same trust boundary as the process group itself. Collectives wait at most the
process group's timeout (``init_process_group(timeout=...)``); a rank that dies or never reaches
calibration ends in that timeout's error, not a hang.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import PTQConfig
from ..data import model_device
from ..errors import CalibrationError, DataError
from ..info import PTQInfo
from ..quant.modules import act_quants, quant_layers

#: relative tolerance of the weight checksum comparison (ranks on different device types sum in
#: different orders)
WEIGHT_RTOL = 1e-9


def is_distributed() -> bool:
    """``True`` when a default process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Counted:
    """An iterable that counts the batches drawn from it."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data, self.count = data, 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.data:
            self.count += 1
            yield batch


def run_on_shard(fn: Callable[[Iterable[Any]], Any], data: Iterable[Any]) -> BaseException | None:
    """Run ``fn(data)`` on this rank's shard and return what it raised (``None`` when it
    succeeded, or when the shard is simply empty), so that the error can be shared with the
    other ranks instead of leaving them waiting."""
    if isinstance(data, (torch.Tensor, dict)):  # let the pipeline's own check reject it
        counted: Any = data
    else:
        counted = _Counted(data)
    try:
        fn(counted)
    except DataError as e:
        return None if isinstance(counted, _Counted) and counted.count == 0 else e
    except Exception as e:
        return e
    return None


def _hash48(text: str) -> list[float]:
    """Three 48-bit chunks of SHA-256 (exact in float64)."""
    d = hashlib.sha256(text.encode()).digest()
    return [float(int.from_bytes(d[i : i + 6], "big")) for i in (0, 6, 12)]


def _structure(model: nn.Module, config: PTQConfig) -> list[str]:
    quants = [
        f"{n}:{type(q).__name__}:{type(q.calibrator).__name__}"
        for n, q in sorted(act_quants(model).items())
    ]
    layers = [f"{n}:{tuple(m.weight_fp.shape)}" for n, m in sorted(quant_layers(model).items())]
    cfg = {k: v for k, v in config.to_dict().items() if k != "progress"}
    return [*quants, *layers, json.dumps(cfg, sort_keys=True, default=str)]


def _weight_checksum(model: nn.Module) -> tuple[float, float]:
    total = absolute = 0.0
    with torch.no_grad():
        for m in quant_layers(model).values():
            w = m.weight_fp.double()
            total += float(w.sum())
            absolute += float(w.abs().sum())
    return total, absolute


def agree(
    model: nn.Module,
    stage: str,
    config: PTQConfig,
    error: BaseException | None,
    counts: tuple[int, int],
) -> torch.Tensor:
    """Check that every rank is at ``stage`` with the same model and config and that none failed.

    Returns the ``[world, 2]`` (batches, samples) of all ranks. Raises on every rank: the local
    ``error`` on the rank that raised it, :class:`CalibrationError` on the others and for any
    mismatch.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    structure = _structure(model, config)
    header = torch.tensor(
        [
            *_hash48(stage),
            *_hash48("\n".join(structure)),
            *_weight_checksum(model),
            float(error is not None),
            float(counts[0]),
            float(counts[1]),
        ],
        dtype=torch.float64,
        device=_comm_device(),
    )
    rows = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(rows, header)
    table = torch.stack(rows).cpu()
    failed = [r for r in range(world) if table[r, 8] > 0]
    if failed:  # every rank takes this branch: the collective below matches on all of them
        messages: list[Any] = [None] * world
        local = f"{type(error).__name__}: {error}" if error is not None else None
        dist.all_gather_object(messages, local)
        if error is not None:
            raise error
        detail = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
        raise CalibrationError(f"{stage} failed on rank(s) {failed} ({detail})")
    stages = table[:, 0:3]
    if not (stages == stages[0]).all():
        raise CalibrationError(
            f"ranks are at different stages ({stage!r} on rank {rank}): every rank must run "
            "ptqkit.quantize with the same PTQConfig (e.g. smoothquant on all ranks or none)"
        )
    struct = table[:, 3:6]
    if not (struct == struct[0]).all():
        lists: list[Any] = [None] * world
        dist.all_gather_object(lists, structure)
        diffs = []
        for r in range(1, world):
            extra = sorted(set(lists[r]) - set(lists[0]))[:3]
            missing = sorted(set(lists[0]) - set(lists[r]))[:3]
            if extra or missing:
                diffs.append(f"rank {r} vs rank 0: has {extra}, lacks {missing}")
        raise CalibrationError(
            "the ranks quantize different models or configs (quantizer names, calibrators, layer "
            "shapes and PTQConfig must match on every rank): " + "; ".join(diffs)
        )
    w = table[:, 6:8]
    if not torch.allclose(w, w[0].expand_as(w), rtol=WEIGHT_RTOL, atol=0.0):
        bad = [r for r in range(world) if not torch.allclose(w[r], w[0], rtol=WEIGHT_RTOL)]
        raise CalibrationError(
            f"the weights of rank(s) {bad} differ from rank 0's: load the same checkpoint on "
            "every rank before quantizing"
        )
    return table[:, 9:11].to(torch.int64)


def all_gather_bytes(payload: bytes) -> list[bytes]:
    """Every rank's ``payload``, in rank order."""
    dev, world = _comm_device(), dist.get_world_size()
    local = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(dev)
    size = torch.tensor([local.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    n = max(int(s) for s in sizes)
    padded = torch.zeros(n, dtype=torch.uint8, device=dev)
    padded[: local.numel()] = local
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return [o[: int(s)].cpu().numpy().tobytes() for o, s in zip(out, sizes)]


def all_reduce_max(tensors: list[torch.Tensor]) -> None:
    """Element-wise maximum over ranks of each tensor, in place (one collective for all)."""
    if not tensors:
        return
    dev = _comm_device()
    flat = torch.cat([t.reshape(-1).float().to(dev) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    for t, part in zip(tensors, torch.split(flat, [t.numel() for t in tensors])):
        t.copy_(part.reshape(t.shape))


def _allowed_classes() -> dict[str, type]:
    """Classes whose state may cross ranks: ptqkit's statistics and the registered calibrators."""
    from .calibrators import CALIBRATORS
    from .stats import HistogramStats, MinMaxStats

    classes = [
        HistogramStats,
        MinMaxStats,
        *(f for f in CALIBRATORS.values() if isinstance(f, type)),
    ]
    return {f"{c.__module__}.{c.__qualname__}": c for c in classes}


def _to_plain(obj: Any) -> Any:
    """An object tree as tensors, numbers, strings and containers only (``torch.load`` with
    ``weights_only=True`` reads it back: nothing received from a peer is unpickled as code)."""
    if isinstance(obj, (torch.Tensor, int, float, str, bool, type(None))):
        return obj
    if isinstance(obj, (list, tuple)):
        return {"__seq__": type(obj).__name__, "items": [_to_plain(v) for v in obj]}
    if isinstance(obj, dict):
        return {"__dict__": {k: _to_plain(v) for k, v in obj.items()}}
    key = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if key not in _allowed_classes():
        raise CalibrationError(f"cannot exchange a {key} between ranks (not a ptqkit statistic)")
    return {"__obj__": key, "state": {k: _to_plain(v) for k, v in vars(obj).items()}}


def _from_plain(d: Any, device: torch.device) -> Any:
    if isinstance(d, torch.Tensor):
        return d.to(device)
    if not isinstance(d, dict):
        return d
    if "__seq__" in d:
        items = [_from_plain(v, device) for v in d["items"]]
        return tuple(items) if d["__seq__"] == "tuple" else items
    if "__dict__" in d:
        return {k: _from_plain(v, device) for k, v in d["__dict__"].items()}
    cls = _allowed_classes().get(d.get("__obj__", ""))
    if cls is None:
        raise CalibrationError(f"a peer sent an unknown statistic type {d.get('__obj__')!r}")
    obj = cls.__new__(cls)
    obj.__dict__.update({k: _from_plain(v, device) for k, v in d["state"].items()})
    return obj


def merge_calibrators(model: nn.Module) -> None:
    """Replace the calibrator of every activation quantizer by the merge, in rank order, of that
    quantizer's calibrators on all ranks (identical on every rank). Call :func:`agree` first.
    Calibrators cross ranks as plain tensors and numbers, read back with ``weights_only=True``."""
    quants = act_quants(model)
    buf = io.BytesIO()
    torch.save({n: _to_plain(q.calibrator) for n, q in quants.items()}, buf)
    device = model_device(model)
    states = [
        {
            n: _from_plain(v, device)
            for n, v in torch.load(io.BytesIO(b), map_location="cpu", weights_only=True).items()
        }
        for b in all_gather_bytes(buf.getvalue())
    ]
    for name, q in quants.items():
        merged = states[0][name]
        for st in itertools.islice(states, 1, None):
            merged.merge(st[name])
        q.calibrator = merged


def observe_and_merge(
    observe: Callable[..., int],
    model: nn.Module,
    data: Iterable[Any],
    config: PTQConfig,
    info: PTQInfo,
) -> None:
    """``observe(model, shard, config, info)`` on this rank, then :func:`agree` and
    :func:`merge_calibrators`; ``info`` gets the totals over all ranks."""
    error = run_on_shard(lambda d: observe(model, d, config, info), data)
    local = (info.calibration_batches, info.calibration_samples) if error is None else (0, 0)
    t0 = time.perf_counter()
    counts = agree(model, "calibrate", config, error, local)
    merge_calibrators(model)
    info.calibration_batches, info.calibration_samples = (int(v) for v in counts.sum(dim=0))
    info.details["distributed"] = {
        "world_size": dist.get_world_size(),
        "rank": dist.get_rank(),
        "backend": str(dist.get_backend()),
        "local_batches": local[0],
        "local_samples": local[1],
        "batches_per_rank": counts[:, 0].tolist(),
        "merge_s": time.perf_counter() - t0,
    }
