"""Running a test's worker on several local processes (torch.distributed, gloo): what the
distributed tests share."""

from __future__ import annotations

import datetime
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, port: int, world: int, timeout_s: float) -> None:
    """In a spawned worker: one thread, warnings off, and this process in the gloo group on the
    loopback (``timeout_s``: a hung collective fails the test instead of hanging CI)."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def run_ranks(
    worker: Callable[..., None], out: Path, world: int, timeout_s: float, what: str
) -> list[dict]:
    """Spawn ``worker(rank, port, out_dir)`` on ``world`` processes, wait at most ``timeout_s``
    (then kill them and fail: "the 2-process <what> did not finish in time"), and return what
    each rank saved as ``out/rank<r>.pt``."""
    ctx = mp.spawn(worker, args=(free_port(), str(out)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world}-process {what} did not finish in time")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
