"""Every data-driven stage across 2 processes (gloo, loopback only), each rank with a different
shard: CLE, ``auto`` calibration, AdaRound, empirical bias correction and the accuracy fallback
give byte-identical saved files on both ranks; without AdaRound (the stages that sum their
statistics over the ranks) the model equals one process's over the union of the shards; a stage
that fails on one rank fails every rank at once.

All scenarios run in one pair of spawned processes (starting them is the slow part)."""

from __future__ import annotations

import hashlib
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
from ptqkit.quant.modules import act_quants, quant_layers

WORLD = 2
TIMEOUT_S = 60  # process-group timeout: a bug that hangs a collective fails the test, not CI
TARGET_DB = 30.0  # output SQNR the fallback must reach: the W4 model is at ~28 dB


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    ).eval()


class VarArgs(nn.Module):
    """``forward(*xs)``: traced, but the cached-input engine cannot bind its inputs, so AdaRound
    and bias correction run the network prefix per layer (the path of untraced models; a truly
    untraceable model would spend ~10 s here in torch.export's failed attempt)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(xs[0])))))


def varargs() -> nn.Module:
    torch.manual_seed(0)
    return VarArgs().eval()


def batches() -> list[torch.Tensor]:
    """4 batches: at most ``AUTO_BATCHES``, so that ``auto`` scores the same batches in one
    process as on the two ranks together."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 8, generator=g) * (1 + k) for k in range(4)]


def shard(rank: int) -> list[torch.Tensor]:
    xs = batches()
    return xs[:2] if rank == 0 else xs[2:]


class FailsAfterCalibration:
    """Batches whose iteration fails after calibration: ``quantize`` iterates them to check
    that they are not one-shot, to take the example batch and to calibrate; ``auto`` is next."""

    def __init__(self, xs: list[torch.Tensor]) -> None:
        self.xs, self.passes = xs, 0

    def __iter__(self):
        self.passes += 1
        if self.passes > 3:
            raise OSError("the shard's storage went away")
        return iter(self.xs)


def config(**kw) -> ptqkit.PTQConfig:
    base = {
        "weights": ptqkit.QuantSpec(bits=4, per_channel=True),
        "cle": True,
        "calibration": "auto",
        "bias_correction": "empirical",
        "min_sqnr_db": TARGET_DB,
        "progress": False,
    }
    return ptqkit.PTQConfig(**{**base, **kw})


#: name -> (data for rank r, config[, model])
SCENARIOS = {
    "all": (shard, config(adaround=True, adaround_iters=10, bias_correction="affine")),
    "prefix_runs": (
        shard, config(adaround=True, adaround_iters=10, bias_correction="affine"), varargs
    ),
    "reduce": (shard, config()),
    "empty_rank": (
        lambda r: batches() if r == 0 else [],
        config(adaround=True, adaround_iters=10, bias_correction="affine"),
    ),
    "failing": (lambda r: shard(r) if r == 0 else FailsAfterCalibration(shard(r)), config()),
}


def state(q: nn.Module) -> dict[str, torch.Tensor]:
    out = {f"{n}.range": a.range.clone() for n, a in act_quants(q).items() if a.calibrated}
    for n, m in quant_layers(q).items():
        out[f"{n}.weight"] = m.weight.detach().clone()
        if m.bias is not None:
            out[f"{n}.bias"] = m.bias.detach().clone()
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    join(rank, port, WORLD, TIMEOUT_S)
    results = {}
    for name, (data, cfg, *make) in SCENARIOS.items():
        t0 = time.perf_counter()
        try:
            q = ptqkit.quantize((make[0] if make else model)(), data(rank), cfg)
            path = os.path.join(out_dir, f"{name}-rank{rank}.ptq")
            ptqkit.save(q, path)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            results[name] = {"state": state(q), "info": q.ptq_info, "sha256": digest}
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - t0
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[list[dict], object]:
    out = tmp_path_factory.mktemp("dist_stages")
    return run_ranks(_worker, out, WORLD, 3 * TIMEOUT_S, "quantization"), out


def _ok(res: dict) -> dict:
    assert "error" not in res, res.get("tb")
    return res


@pytest.mark.parametrize("name", ["all", "reduce", "prefix_runs"])
def test_ranks_save_byte_identical_files(two_ranks, name):
    ranks, out = two_ranks
    a, b = (_ok(ranks[r][name]) for r in range(WORLD))
    assert a["sha256"] == b["sha256"]
    assert (out / f"{name}-rank0.ptq").read_bytes() == (out / f"{name}-rank1.ptq").read_bytes()
    info = a["info"]
    assert info.details["fallback"]["kept_float"]  # the target made it put layers back
    assert info.details["fallback"]["met"] and info.details["fallback"]["samples"] == 64
    if name == "prefix_runs":
        assert not info.details["adaround"]["engine"]["cached_inputs"]
        assert info.details["bias_correction"]["passes"] > 2
    else:
        assert info.details["bias_correction"]["engine"]["batches"] == 4  # both shards
    assert info.details["distributed"]["rank_local"] == []  # nothing taken from rank 0 alone
    if name != "reduce":
        assert info.details["bias_correction"]["scaled"]  # affine: the pairs of both ranks
        layers = info.details["adaround"]["layers"]
        assert all(rec["rows"] == 64 for rec in layers.values())  # rows of both ranks


def test_saved_model_is_close_to_float(two_ranks):
    _, out = two_ranks
    x = torch.cat(batches())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = ptqkit.load(out / "all-rank1.ptq", model())
    with torch.no_grad():
        y, yq = model()(x), q(x)
    sqnr = 10 * torch.log10(y.pow(2).sum() / (y - yq).pow(2).sum())
    assert sqnr >= TARGET_DB  # the fallback's target, on the union of the shards
    assert (y.argmax(1) == yq.argmax(1)).float().mean() >= 0.95


def test_reduce_stages_equal_one_process_over_the_union(two_ranks):
    """CLE, auto, bias correction and fallback sum their statistics over the ranks: the model
    equals one process's on all the data (ranges, choices and fallback bit for bit; the
    corrected biases up to float64 rounding: the sums are grouped per rank before being added)."""
    ranks, _ = two_ranks
    res = _ok(ranks[0]["reduce"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = ptqkit.quantize(model(), batches(), SCENARIOS["reduce"][1])
    ref = state(one)
    assert res["state"].keys() == ref.keys()
    for k, v in ref.items():
        if k.endswith(".bias"):
            torch.testing.assert_close(res["state"][k], v, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(res["state"][k], v), k
    info, inf1 = res["info"], one.ptq_info
    assert info.chosen == inf1.chosen
    fb, fb1 = info.details["fallback"], inf1.details["fallback"]
    assert [k["layer"] for k in fb["kept_float"]] == [k["layer"] for k in fb1["kept_float"]]
    assert fb["after"]["sqnr_db"] == pytest.approx(fb1["after"]["sqnr_db"], rel=1e-9)
    assert fb["before"]["agreement"] == fb1["before"]["agreement"]


def test_rank_without_data(two_ranks):
    """A rank with an empty shard contributes nothing: both ranks save the model one process
    makes from rank 0's data (AdaRound included: it learns on rank 0's rows either way)."""
    ranks, _ = two_ranks
    a, b = (_ok(ranks[r]["empty_rank"]) for r in range(WORLD))
    assert a["sha256"] == b["sha256"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = ptqkit.quantize(model(), batches(), SCENARIOS["empty_rank"][1])
    ref = state(one)
    for k, v in ref.items():
        torch.testing.assert_close(a["state"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    kept = one.ptq_info.details["fallback"]["kept_float"]
    assert kept and a["info"].details["fallback"]["kept_float"] == kept


def test_failing_stage_fails_every_rank(two_ranks):
    ranks, _ = two_ranks
    assert ranks[1]["failing"]["error"].startswith("OSError")  # its own error
    err = ranks[0]["failing"]["error"]
    assert err.startswith("DistributedError") and "rank(s) [1]" in err and "went away" in err
    assert "in calibration='auto'" in err  # the stage that failed
    assert ranks[0]["failing"]["seconds"] < TIMEOUT_S / 2  # no waiting for a timeout
