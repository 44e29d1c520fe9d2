"""ptqkit.tune under torch.distributed (2 processes, gloo, loopback): each rank holds out and
scores on its own shard, the scores are summed over the ranks and every decision on time is rank
0's, so both ranks run the same trials and save byte-identical files."""

from __future__ import annotations

import hashlib
import os
import traceback

import pytest
import torch
import torch.distributed as dist
from _ranks import join, run_ranks
from torch import nn

import ptqkit
from ptqkit.recipe import Candidate

WORLD = 2
TIMEOUT_S = 60  # process-group timeout: a hung collective fails the test, not CI

#: cheap candidates, plus one whose expected time never fits (the skip is rank 0's decision)
CANDIDATES = [
    Candidate("mse", {"calibration": "mse"}),
    Candidate("percentile", {"calibration": "percentile"}),
    Candidate("empirical BC", {"bias_correction": "empirical"}),
    Candidate("AdaRound forever", {"adaround": True, "adaround_iters": 10**9}),
    Candidate("AdaRound", {"adaround": True, "adaround_iters": 20}),
]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    ).eval()


def shard(rank: int) -> list[torch.Tensor]:
    """8 batches of 16 per rank; rank 1's inputs have another scale (other ranges, other
    scores: the ranks alone would not agree on a recipe)."""
    g = torch.Generator().manual_seed(10 + rank)
    return [torch.randn(16, 8, generator=g) * (1 + 3 * rank) for _ in range(8)]


def _worker(rank: int, port: int, out_dir: str) -> None:
    join(rank, port, WORLD, TIMEOUT_S)
    res: dict = {}
    try:
        cfg = ptqkit.PTQConfig(weights=ptqkit.QuantSpec(bits=4, per_channel=True), progress=False)
        q = ptqkit.tune(model(), shard(rank), cfg, budget_s=60, candidates=CANDIDATES)
        path = os.path.join(out_dir, f"tuned-rank{rank}.ptq")
        ptqkit.save(q, path)
        with open(path, "rb") as f:
            res["sha256"] = hashlib.sha256(f.read()).hexdigest()
        res["recipe"] = q.ptq_info.details["recipe"]
    except Exception as e:
        res = {"error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
    try:  # a rank whose shard cannot be split stops both ranks, with the reason
        one = [shard(rank)[0][:1]]  # one sample: nothing to hold out
        ptqkit.tune(model(), one if rank == 1 else shard(rank), budget_s=10)
        res["short_shard"] = "no error"
    except Exception as e:
        res["short_shard"] = f"{type(e).__name__}: {e}"
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_worker, tmp_path_factory.mktemp("tune"), WORLD, 4 * TIMEOUT_S, "tune")


def test_ranks_run_the_same_trials_and_save_identical_files(ranks):
    for r in ranks:
        assert "error" not in r, r.get("tb")
    a, b = (r["recipe"] for r in ranks)
    assert a == b
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    assert a["held_out_samples"] == 2 * 2 * 16  # 2 of 8 batches held out on each rank
    status = {t["name"]: t["status"] for t in a["trials"]}
    assert status["AdaRound forever"] == "skipped" and status["AdaRound"] == "ran", status
    assert status["percentile"] == "ran" and status["empirical BC"] == "ran", status


def test_a_rank_that_cannot_split_its_shard_stops_every_rank(ranks):
    assert "DataError" in ranks[1]["short_shard"], ranks[1]["short_shard"]
    assert "rank(s) [1] failed" in ranks[0]["short_shard"], ranks[0]["short_shard"]
