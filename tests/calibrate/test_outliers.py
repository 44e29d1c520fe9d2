"""Outlier-robust calibration (issue 15): one value of 1e6 among 40,960 N(0, 1) values changes no
histogram calibrator's range by more than 10 % nor a quantized model's SQNR by more than 1 dB,
and it is reported (``ptq_info.outliers``, one PTQWarning, the advice) with its layer and batch.
The KL guard replaces a range that cuts into the body of the data and says so."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.advice import advise, gather
from ptqkit.calibrate import HistogramStats, make_calibrator
from ptqkit.calibrate.bulk import OUTLIER_RATIO, bulk, clipped_energy, outlier_ratio
from ptqkit.config import PTQConfig, QuantSpec
from ptqkit.errors import PTQWarning

SYM, ASYM, ASYM4 = QuantSpec(symmetric=True), QuantSpec(symmetric=False), QuantSpec(bits=4)
ROBUST = ["percentile", "mse", "kl", "auto_percentile"]


def _gaussian(n: int = 40_960, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _with_outlier(x: torch.Tensor, at: int = 12_345, value: float = 1e6) -> torch.Tensor:
    """``x`` with one more value, ``value``, inserted at ``at``."""
    return torch.cat([x[:at], torch.tensor([value]), x[at:]])


def _range(name: str, x: torch.Tensor, spec: QuantSpec) -> tuple[float, float]:
    cal = make_calibrator(name)
    for b in x.split(4096):
        cal.observe(b)
    lo, hi = cal.compute_range(spec)
    return float(lo), float(hi)


@pytest.mark.parametrize("spec", [SYM, ASYM, ASYM4], ids=str)
@pytest.mark.parametrize("name", ROBUST)
def test_one_outlier_moves_no_range_by_more_than_10_percent(name, spec):
    x = _gaussian()
    clean, dirty = _range(name, x, spec), _range(name, _with_outlier(x), spec)
    for c, d in zip(clean, dirty):
        assert abs(d - c) <= 0.1 * abs(c), (name, clean, dirty)
    assert _range("minmax", _with_outlier(x), spec)[1] == 1e6  # minmax keeps it, as it should


@pytest.mark.parametrize(
    "kind", ["gaussian", "laplace", "relu", "student_t2", "few_zeros", "small_n"]
)
def test_ordinary_data_has_no_outliers(kind):
    g = torch.Generator().manual_seed(3)
    n = 200_000 if kind != "small_n" else 50
    z = torch.randn(n, generator=g)
    x = {
        "gaussian": z,
        "laplace": z.sign() * torch.empty(n).exponential_(generator=g),
        "relu": z.relu(),
        "student_t2": z / (torch.randn(n, 2, generator=g).pow(2).sum(1) / 2).sqrt(),
        "few_zeros": z * (torch.rand(n, generator=g) < 0.001),  # 99.9 % exact zeros
        "small_n": z,
    }[kind]
    h = HistogramStats()
    h.update(x)
    ratio, _ = outlier_ratio(h)
    assert float(ratio[0]) < OUTLIER_RATIO * (0.6 if kind == "student_t2" else 0.05)
    assert bulk(h).counts is h.counts  # nothing set aside


def test_the_bulk_is_the_data_without_the_outlier():
    x = _gaussian()
    h = HistogramStats()
    h.update(_with_outlier(x))
    ratio, q = outlier_ratio(h)
    assert float(ratio[0]) > 1e5 and 3.0 < float(q[0]) < 3.6  # the 99.9th percentile of N(0, 1)
    b = bulk(h)
    assert float(b.counts.sum()) == x.numel()  # exactly the one value is set aside
    assert float(b.hi[0]) == pytest.approx(float(x.max()), rel=2**-7)
    assert float(b.lo[0]) == float(x.min())


def _tiny_model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def _sqnr(qmodel: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = model(x)
        err = qmodel(x) - ref
    return float(10 * torch.log10(ref.pow(2).sum() / err.pow(2).sum()))


@pytest.mark.parametrize("name", ROBUST)
def test_quantized_model_ignores_and_reports_one_outlier(name):
    """20 batches of 64 × 32 = 40,960 input values; batch 7 holds one 1e6."""
    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    clean = [torch.randn(64, 32, generator=g) for _ in range(20)]
    dirty = [b.clone() for b in clean]
    dirty[7][5, 3] = 1e6
    held_out = torch.randn(512, 32, generator=g)
    config = PTQConfig(calibration=name)
    q_clean = ptqkit.quantize(model, clean, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q_dirty = ptqkit.quantize(model, dirty, config)
    s_clean, s_dirty = _sqnr(q_clean, model, held_out), _sqnr(q_dirty, model, held_out)
    assert s_clean > 30 and abs(s_dirty - s_clean) <= 1.0, (s_clean, s_dirty)

    assert q_clean.ptq_info.outliers == {}
    found = q_dirty.ptq_info.outliers
    inputs = [o for label, o in found.items() if "input" in label]
    assert len(inputs) == 1
    assert inputs[0]["batch"] == 7 and inputs[0]["max"] == 1e6 and inputs[0]["ratio"] > 1e5
    # one corrupt sample reaches its row of the hidden layer too: reported there, same batch
    assert all(o["batch"] == 7 for o in found.values())
    ours = [w for w in caught if issubclass(w.category, PTQWarning) and "outlier" in str(w.message)]
    assert len(ours) == 1 and "calibration batch 7 (sample 5) holds 1e+06" in str(ours[0].message)
    assert "left out" in str(ours[0].message) and "NOT left out" not in str(ours[0].message)
    assert all(o["kind"] == "sample" and o["left_out"] for o in found.values())
    tips = [a for a in advise(gather(q_dirty)) if a.rule == "calibration_outliers"]
    assert len(tips) == 1 and tips[0].level == "warning"
    assert "calibration batch 7 (sample 5) holds 1e+06 at input" in tips[0].message
    assert "median sample" in tips[0].message and "check the data" in tips[0].message
    assert not [a for a in advise(gather(q_clean)) if a.rule == "calibration_outliers"]


def _student_t2(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g)
    return z / (torch.randn(n, 2, generator=g).pow(2).sum(1) / 2).sqrt()


def test_kl_guard_falls_back_to_mse_and_says_so():
    """KL's 4-bit range on Student-t (df 2) data cuts into the body: > 5 % of its energy."""
    spec = QuantSpec(bits=4, symmetric=True)
    kl = make_calibrator("kl")
    kl.observe(_student_t2(100_000, 4))
    lo, hi = kl.compute_range(spec)
    mse = make_calibrator("mse")
    mse.stats = kl.stats
    assert (float(lo), float(hi)) == tuple(float(v) for v in mse.compute_range(spec))
    assert kl.fallback["to"] == "mse" and kl.fallback["clipped_energy"] > 0.05
    assert float(clipped_energy(kl.stats, lo.reshape(1), hi.reshape(1))[0]) < 0.05
    # on Gaussian data KL keeps its own range
    gauss = make_calibrator("kl")
    gauss.observe(_gaussian())
    gauss.compute_range(spec)
    assert gauss.fallback is None


def test_kl_guard_is_recorded_in_ptq_info():
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    data = [_student_t2(64 * 16, i).reshape(64, 16) for i in range(10)]
    config = PTQConfig(calibration="kl", activations=QuantSpec(bits=4, symmetric=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = ptqkit.quantize(model, data, config)
    fb = q.ptq_info.details["range_fallback"]
    assert len(fb) >= 1
    label, entry = next(iter(fb.items()))
    assert "input" in label and entry["from"] == "kl" and entry["to"] == "mse"
    assert entry["clipped_energy"] > 0.05
    assert any("KL range" in str(w.message) for w in caught)


def test_range_fallback_warning_is_decided_by_this_pass_not_by_info():
    """The KL-guard warning comes from the calibrators just solved (range_fallbacks), not from
    what ``info.details`` already holds: a stale entry there warns nothing, and a pass with a
    replaced range records it typed (from/to/clipped_energy/channels/quantizer)."""
    from ptqkit.calibrate.calibrators import make_calibrator
    from ptqkit.calibrate.outliers import range_fallbacks, record
    from ptqkit.info import PTQInfo

    spec = QuantSpec(bits=4, symmetric=True)
    gauss = make_calibrator("kl")
    gauss.observe(_gaussian())
    gauss.compute_range(spec)
    info = PTQInfo(details={"range_fallback": {"stale": {"from": "kl", "to": "mse"}}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record({"q0": gauss}, {"q0": "x"}, info)
    assert not any("KL range" in str(w.message) for w in caught)
    assert range_fallbacks({"q0": gauss}, {"q0": "x"}) == {}
    heavy = make_calibrator("kl")
    heavy.observe(_student_t2(100_000, 4))  # the case test_kl_guard_falls_back_to_mse uses
    heavy.compute_range(spec)
    fb = range_fallbacks({"q1": heavy}, {"q1": "y"})
    assert set(fb) == {"y"} and fb["y"]["quantizer"] == "q1" and fb["y"]["from"] == "kl"
    assert fb["y"]["channels"] >= 1 and fb["y"]["clipped_energy"] > 0.05
