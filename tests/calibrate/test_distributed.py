"""Calibration across 2 processes (gloo, loopback only) equals calibration in one process over
all the data; a rank without data, a failing rank and ranks with different models end in a clear
error on every rank instead of a hang.

All scenarios run in one pair of spawned processes (starting them is the slow part)."""

from __future__ import annotations

import os
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
from _ranks import join, run_ranks
from torch import nn

import ptqkit
from ptqkit.quant.modules import act_quants

WORLD = 2
TIMEOUT_S = 60  # process-group timeout: a bug that hangs a collective fails the test, not CI


class MLP(nn.Module):
    """Traceable: quantizers are placed in the graph (shared input quantizers, outputs)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Untraceable(nn.Module):
    """Data-dependent control flow: the per-layer input quantizers of the fallback; a LayerNorm
    before fc1 for SmoothQuant."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.ln(x))
        if h.sum() > 0:
            h = h * 2
        return self.fc2(torch.relu(h))


def model(kind: str = "mlp", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return (MLP() if kind == "mlp" else MLP(24) if kind == "wide" else Untraceable()).eval()


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 8, generator=g) for _ in range(6)]
    xs[3][0, 2] = 40.0  # an outlier channel value on one shard only
    return xs


def shard(rank: int) -> list[torch.Tensor]:
    """Contiguous shards: rank 0 gets the first half of the batches, rank 1 the second."""
    xs = batches()
    return xs[: len(xs) // 2] if rank == 0 else xs[len(xs) // 2 :]


def with_outlier() -> list[torch.Tensor]:
    xs = batches()
    xs[4][1, 5] = 1e5  # batch 4 of all the data: rank 1's second batch
    return xs


def config(calibration: str = "minmax", **kw) -> ptqkit.PTQConfig:
    return ptqkit.PTQConfig(calibration=calibration, progress=False, **kw)


def ranges(qmodel: nn.Module) -> dict[str, tuple[torch.Tensor, ...]]:
    return {n: (q.range, q.scale, q.zero_point) for n, q in act_quants(qmodel).items()}


#: name -> (model kind for rank r, data for rank r, config)
SCENARIOS = {
    "minmax": (lambda r: model(), shard, config()),
    "kl": (lambda r: model(), shard, config("kl")),
    "percentile": (
        lambda r: model(),
        shard,
        config("percentile", calibrator_options={"percentile": 95.0}),
    ),
    "smoothquant": (lambda r: model("untraceable"), shard, config(smoothquant=0.5)),
    "empty_rank": (lambda r: model(), lambda r: batches() if r == 0 else [], config()),
    "outlier": (
        lambda r: model(),
        lambda r: with_outlier()[:3] if r == 0 else with_outlier()[3:],
        config("percentile"),
    ),
    "failing_rank": (
        lambda r: model(),
        lambda r: shard(r) if r == 0 else [torch.randn(4, 5)],
        config(),
    ),
    "different_model": (lambda r: model("mlp" if r == 0 else "wide"), shard, config()),
    "different_weights": (lambda r: model(seed=r), shard, config()),
}


def _worker(rank: int, port: int, out_dir: str) -> None:
    join(rank, port, WORLD, TIMEOUT_S)
    results = {}
    for name, (make, data, cfg) in SCENARIOS.items():
        t0 = time.perf_counter()
        try:
            q = ptqkit.quantize(make(rank), data(rank), cfg)
            results[name] = {"ranges": ranges(q), "info": q.ptq_info}
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - t0
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    return run_ranks(_worker, out, WORLD, 3 * TIMEOUT_S, "calibration")


def single(name: str) -> dict[str, tuple[torch.Tensor, ...]]:
    make, _, cfg = SCENARIOS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ranges(ptqkit.quantize(make(0), batches(), cfg))


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        for x, y in zip(a[n], b[n]):
            assert torch.equal(x, y), (n, x, y)


@pytest.mark.parametrize("name", ["minmax", "kl", "percentile", "smoothquant", "empty_rank"])
def test_two_ranks_equal_one_process(two_ranks, name):
    ref = single(name)
    for r in range(WORLD):
        res = two_ranks[r][name]
        assert "error" not in res, res.get("tb")
        _equal(res["ranges"], ref)  # bit-identical ranges, scales and zero points
        info = res["info"]
        assert info.calibration_batches == len(batches())  # totals over the ranks
        assert info.details["distributed"]["world_size"] == WORLD


def test_empty_rank_reports_no_local_batches(two_ranks):
    for r in range(WORLD):  # the same record on every rank (the saved files must not differ)
        record = two_ranks[r]["empty_rank"]["info"].details["distributed"]
        assert record["batches_per_rank"] == [6, 0]
        assert record["samples_per_rank"] == [96, 0]
        assert "rank" not in record and "merge_s" not in record


def test_outlier_batch_numbered_over_all_ranks(two_ranks):
    """The batch holding an outlier is numbered over the ranks' batches in rank order: the same
    on every rank (and in every saved file), and the batch one process over all data names."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = ptqkit.quantize(model(), with_outlier(), config("percentile")).ptq_info
    assert one.outliers and all(o["batch"] == 4 for o in one.outliers.values())
    same = ("quantizer", "kind", "batch", "sample", "samples", "max", "left_out", "range")
    infos = [two_ranks[r]["outlier"]["info"] for r in range(WORLD)]
    for info in infos:
        assert info.outliers.keys() == one.outliers.keys()
        for label, o in one.outliers.items():  # the same sample found, left out, numbered
            assert {k: info.outliers[label].get(k) for k in same} == {k: o.get(k) for k in same}
        # identical on every rank (the saved files must not differ); the median sample each rank
        # compares with is its own shard's
        assert info.outliers == infos[0].outliers
        assert [w for w in info.warnings if "outliers" in w] == [
            w for w in infos[0].warnings if "outliers" in w
        ]


def test_failing_rank_fails_every_rank(two_ranks):
    assert two_ranks[1]["failing_rank"]["error"].startswith("DataError")  # its own error
    err = two_ranks[0]["failing_rank"]["error"]
    assert err.startswith("CalibrationError") and "rank(s) [1]" in err
    assert two_ranks[0]["failing_rank"]["seconds"] < TIMEOUT_S / 2  # no waiting for a timeout


@pytest.mark.parametrize(
    ("name", "words"),
    [("different_model", "different models"), ("different_weights", "weights of rank(s) [1]")],
)
def test_mismatched_ranks_raise_clear_error(two_ranks, name, words):
    for r in range(WORLD):
        res = two_ranks[r][name]
        assert res["error"].startswith("CalibrationError") and words in res["error"]
        assert res["seconds"] < TIMEOUT_S / 2


def test_different_model_names_the_difference(two_ranks):
    err = two_ranks[0]["different_model"]["error"]
    assert "(24, 8)" in err  # the layer shapes that differ
