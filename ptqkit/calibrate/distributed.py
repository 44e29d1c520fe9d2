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

The later data-driven stages keep the ranks in step with :mod:`ptqkit.sync` (sums over the ranks
for ``auto``, bias correction and the fallback's scores; AdaRound's rounding learned on rank 0
from every rank's rows and sent to all). At the end of :func:`ptqkit.quantize`, :func:`finish`
checks that every rank holds the same model (a :class:`~ptqkit.errors.DistributedError`
otherwise) and makes ``ptq_info`` the same on every rank, so that :func:`ptqkit.save` writes
byte-identical files; ``info.details["distributed"]`` holds only what is the same on every rank
(world size, backend, batches and samples per rank), the merge time is the stage time
``info.stages["distributed_merge"]``.

The states are exchanged as plain tensors and numbers (``torch.save``, read back with
``torch.load(weights_only=True)``): the peers are the ranks of the same job, the same trust
boundary as the process group itself. Collectives wait at most the
process group's timeout (``init_process_group(timeout=...)``); a rank that dies or never reaches
calibration ends in that timeout's error, not a hang.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from ..config import PTQConfig
from ..data import model_device
from ..errors import CalibrationError, DataError
from ..info import PTQInfo
from ..quant.modules import act_quants, quant_layers
from ..sync import all_gather_bytes, comm_device
from .watch import Flag

#: relative tolerance of the weight checksum comparison (ranks on different device types sum in
#: different orders)
WEIGHT_RTOL = 1e-9


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
        device=comm_device(),
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


def all_reduce_max(tensors: list[torch.Tensor]) -> None:
    """Element-wise maximum over ranks of each tensor, in place (one collective for all)."""
    if not tensors:
        return
    dev = comm_device()
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
    obj = cast(Any, cls).__new__(cls)  # the instance without __init__: its state follows
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


def _global_batches(tracker: Any, batches_per_rank: list[int]) -> None:
    """Make ``tracker`` (a :class:`~ptqkit.calibrate.outliers.BatchMaxTracker`) say, for every
    quantizer, which batch holds the maximum over all ranks, numbering the batches of all ranks
    one after another in rank order (rank 1's first batch follows rank 0's last): the same on
    every rank, and the index one process would report over the shards concatenated."""
    from ..sync import exchange

    mine = {n: (float(m), int(i)) for n, (m, i) in tracker.best.items()}
    rows = exchange("calibrate: outlier batches", mine)
    offsets = list(itertools.accumulate([0, *batches_per_rank]))
    for name in dict.fromkeys(n for row in rows for n in row):
        found = [(row[name][0], r, row[name][1]) for r, row in enumerate(rows) if name in row]
        top = max(m for m, _, _ in found)
        _, r, i = next(f for f in found if f[0] == top)  # the lowest rank holding it
        tracker.best[name] = (torch.tensor(top), torch.tensor(offsets[r] + i))
    # the outlier samples (ptqkit.calibrate.watch) of every rank, numbered the same way
    flags = tracker.samples.flags
    rows = exchange("calibrate: outlier samples", [dataclasses.astuple(f) for f in flags])
    flags.clear()
    for r, row in enumerate(rows):
        for q, label, b, s, m, typical, left_out in row:
            flags.append(Flag(q, label, offsets[r] + b, s, m, typical, left_out))


def observe_and_merge(
    observe: Callable[..., int],
    model: nn.Module,
    data: Iterable[Any],
    config: PTQConfig,
    info: PTQInfo,
    tracker: Any = None,
) -> None:
    """``observe(model, shard, config, info)`` on this rank, then :func:`agree` and
    :func:`merge_calibrators`; ``info`` gets the totals over all ranks. ``tracker`` (the
    :class:`~ptqkit.calibrate.outliers.BatchMaxTracker` ``observe`` reports batches to) is
    made to number the batches over all ranks."""
    error = run_on_shard(lambda d: observe(model, d, config, info), data)
    local = (info.calibration_batches, info.calibration_samples) if error is None else (0, 0)
    t0 = time.perf_counter()
    counts = agree(model, "calibrate", config, error, local)
    merge_calibrators(model)
    if tracker is not None:
        _global_batches(tracker, counts[:, 0].tolist())
    info.calibration_batches, info.calibration_samples = (int(v) for v in counts.sum(dim=0))
    # the same on every rank (the saved files must be identical): this rank's own counts are
    # batches_per_rank[rank]; the merge time is a stage time
    info.details["distributed"] = {
        "world_size": dist.get_world_size(),
        "backend": str(dist.get_backend()),
        "batches_per_rank": counts[:, 0].tolist(),
        "samples_per_rank": counts[:, 1].tolist(),
    }
    info.stages["distributed_merge"] = time.perf_counter() - t0


# -- the end of quantize: one model on every rank --------------------------------------------------
def model_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes, bytes), of which layers
    hold quantized weights and of the activation quantizers' modes."""
    h = hashlib.sha256()
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    flags = {n: m.quantized for n, m in quant_layers(model).items()}
    modes = {n: q.mode for n, q in act_quants(model).items()}
    h.update(json.dumps([flags, modes], sort_keys=True).encode())
    return h.hexdigest()


def _combine(field: str, values: list[Any]) -> tuple[Any, bool]:
    """One value of a record field that differs between ranks, the same on every rank, and
    whether it is rank 0's (``True``) rather than a combination of all."""
    if field == "capture_error":
        return max(values), False
    if field == "capture_checks":
        keys = list(dict.fromkeys(k for v in values for k in v))
        return {k: max(v[k] for v in values if k in v) for k in keys}, False
    if field == "warnings":
        return list(dict.fromkeys(w for v in values for w in v)), False
    return values[0], True


def finish(qmodel: nn.Module, info: PTQInfo) -> None:
    """Check that every rank ended with the same quantized model and make ``info`` the same on
    every rank (so that :func:`ptqkit.save` writes the same bytes on all of them).

    The model: a :class:`~ptqkit.errors.DistributedError` on every rank, naming the ranks, if
    their :func:`model_digest` differ. The record (``ptq_info`` without stage times): the
    data-driven stages already record totals over the ranks; what a rank measured on its own
    first batch differs: ``capture_error`` and ``capture_checks`` become the largest over the
    ranks, ``warnings`` the union (in rank order); any other field or ``details`` entry that
    still differs is taken from rank 0 and listed in ``details["distributed"]["rank_local"]``.
    """
    from ..errors import DistributedError
    from ..sync import exchange, guard

    with guard("the end of quantize"):
        mine = {k: v for k, v in info.to_dict().items() if k != "stages"}
        details = mine.pop("details")
        text = {k: json.dumps(v, sort_keys=True, default=str) for k, v in mine.items()}
        dtext = {k: json.dumps(v, sort_keys=True, default=str) for k, v in details.items()}
        digest = model_digest(qmodel)
    rows = exchange("the end of quantize", [digest, text, dtext])
    digests = [r[0] for r in rows]
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise DistributedError(
            f"rank(s) {bad} ended with a different quantized model than rank 0 (a stage that "
            "does not synchronize across ranks?); their saved files would differ"
        )
    rank_local = []
    for field in text:
        vals = [r[1][field] for r in rows]
        if any(v != vals[0] for v in vals):
            value, local = _combine(field, [json.loads(v) for v in vals])
            setattr(info, field, value)
            if local:
                rank_local.append(field)
    keys = list(dict.fromkeys(k for r in rows for k in r[2]))
    records = cast(dict[str, Any], info.details)  # by key, whichever: rank 0's JSON as it was
    for key in keys:
        vals = [r[2].get(key) for r in rows]
        if any(v != vals[0] for v in vals):
            if vals[0] is None:
                records.pop(key, None)
            else:
                records[key] = json.loads(vals[0])
            rank_local.append(f"details.{key}")
    record = info.details.setdefault("distributed", {"world_size": dist.get_world_size()})
    record["rank_local"] = rank_local
