"""Outlier samples in the calibration data (ptqkit.calibrate.watch): found at every quantizer,
left out by the histogram calibrators, named (quantizer, batch, sample) for every calibrator,
and non-finite data refused naming the batch and the sample."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit import PTQConfig
from ptqkit.errors import CalibrationError, DataError, NonFiniteDataError, PTQWarning
from ptqkit.zoo import digits

ROBUST = ["percentile", "kl", "mse", "auto_percentile", "auto"]


def _net() -> nn.Module:
    """A small conv net on 8×8 digits, fixed random weights (no training: the same on any CPU)."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1 / max(p[0].numel(), 1)) ** 0.5)
    return net


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    x, _ = digits()
    x = (x.float().reshape(-1, 1, 8, 8) - 4.9) / 6.0  # real images, standardized
    return x[:256], x[1000:1300]


def _sqnr(q: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = model(x)
        return float(10 * torch.log10(ref.pow(2).sum() / (q(x) - ref).pow(2).sum()))


def _quantize(model, calib, config, bs=32):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = ptqkit.quantize(model, [calib[i : i + bs] for i in range(0, len(calib), bs)], config)
    return q, [str(w.message) for w in caught if issubclass(w.category, PTQWarning)]


@pytest.mark.parametrize("value", [1e3, 1e12, 1e30])
@pytest.mark.parametrize("name", ROBUST)
def test_one_poisoned_sample_costs_the_robust_calibrators_nothing(name, value):
    """One pixel of one sample set to 1e3..1e30 (default bias correction included): the model
    stays within 1 dB of the one calibrated on the clean data, and the sample is named."""
    model, (calib, test) = _net(), _data()
    dirty = calib.clone()
    dirty[37, 0, 0, 5] = value  # batch 1, sample 5
    config = PTQConfig(calibration=name)
    q_clean, _ = _quantize(model, calib, config)
    q_dirty, said = _quantize(model, dirty, config)
    s_clean, s_dirty = _sqnr(q_clean, model, test), _sqnr(q_dirty, model, test)
    assert s_clean > 25 and abs(s_dirty - s_clean) <= 1.0, (s_clean, s_dirty)
    found = q_dirty.ptq_info.outliers
    o = found["input of 0 (input)"] if "input of 0 (input)" in found else next(iter(found.values()))
    assert o["kind"] == "sample" and (o["batch"], o["sample"]) == (1, 5) and o["left_out"]
    assert o["max"] == pytest.approx(value, rel=1e-6)
    msg = [m for m in said if "outliers" in m]
    assert len(msg) == 1 and "calibration batch 1 (sample 5)" in msg[0] and "left out" in msg[0]
    assert "NOT left out" not in msg[0]


@pytest.mark.parametrize("name", ["minmax", "ema"])
def test_minmax_and_ema_keep_the_sample_and_say_so(name):
    """minmax / ema take the observed extremes by definition: they keep the sample, and the
    warning names the quantizers, the batch, and says the range was NOT protected."""
    model, (calib, _) = _net(), _data()
    dirty = calib.clone()
    dirty[37, 0, 0, 5] = 1e6
    q, said = _quantize(model, dirty, PTQConfig(calibration=name))
    found = q.ptq_info.outliers
    assert found and all(o["kind"] == "sample" and not o["left_out"] for o in found.values())
    assert all((o["batch"], o["sample"]) == (1, 5) for o in found.values())
    first = next(o for label, o in found.items() if "input" in label)
    assert first["range"] > 1e3  # its range spans the outlier: that is what it says
    msg = next(m for m in said if "outliers" in m)
    assert "calibration batch 1 (sample 5)" in msg and "NOT left out" in msg
    assert all(label in msg for label in found)
    q_clean, said_clean = _quantize(model, calib, PTQConfig(calibration=name))
    assert q_clean.ptq_info.outliers == {} and not [m for m in said_clean if "outliers" in m]


def test_a_poisoned_first_sample_is_found_with_batches_of_one():
    """No reference before the first samples: they are held until there is one, so a corrupt
    very first sample (batches of one sample) is still found and left out."""
    model, (calib, test) = _net(), _data()
    calib = calib[:64]
    dirty = calib.clone()
    dirty[0, 0, 3, 3] = 1e12
    config = PTQConfig(calibration="mse", bias_correction=False)
    q_clean, _ = _quantize(model, calib, config, bs=1)
    q_dirty, _ = _quantize(model, dirty, config, bs=1)
    assert abs(_sqnr(q_dirty, model, test) - _sqnr(q_clean, model, test)) <= 1.0
    o = next(iter(q_dirty.ptq_info.outliers.values()))
    assert (o["batch"], o["sample"], o["left_out"]) == (0, 0, True)


def test_ordinary_data_flags_no_sample():
    model, (calib, _) = _net(), _data()
    q, said = _quantize(model, calib, PTQConfig())
    assert q.ptq_info.outliers == {} and not [m for m in said if "outliers" in m]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["minmax", "ema", "mse"])
def test_non_finite_data_is_refused_naming_batch_and_sample(name, bad):
    model, (calib, _) = _net(), _data()
    dirty = calib[:96].clone()
    dirty[40, 0, 2, 2] = bad  # batch 1, sample 8
    with pytest.raises(NonFiniteDataError, match=r"input of .*calibration batch 1, sample 8"):
        _quantize(model, dirty, PTQConfig(calibration=name))
    assert issubclass(NonFiniteDataError, DataError)
    assert issubclass(NonFiniteDataError, CalibrationError)
