"""Every data-driven bias correction is checked on the rows it was fitted on and written only
when it does not raise the layer's error (ptqkit.correct.check); the record says which."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit import PTQConfig
from ptqkit.correct.affine import Paired
from ptqkit.correct.check import check


def _paired(q: torch.Tensor, y: torch.Tensor) -> Paired:
    p = Paired(q.shape[-1])
    p.add(q, y)
    return p


def test_a_consistent_shift_is_kept_and_a_corrupt_sample_is_not():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(64, 4, 3, generator=g)
    q = y - 0.5 + 0.05 * torch.randn(y.shape, generator=g)  # every sample 0.5 too low
    good = check(_paired(q, y), (y - q).mean((0, 1)), None, "t")
    assert good is not None and good.kept and good.trimmed_after < good.trimmed_before
    y_bad = y.clone()
    y_bad[7] = 1e6  # one corrupt sample: the mean shift follows it
    bad = check(_paired(q, y_bad), (y_bad - q).mean((0, 1)), None, "t")
    assert bad is not None and not bad.kept
    assert bad.mean_after < bad.mean_before  # the mean alone would have accepted it
    assert bad.trimmed_after > 1e6 * bad.trimmed_before


def _mlp() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def _sqnr(q: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = model(x)
        return float(10 * torch.log10(ref.pow(2).sum() / (q(x) - ref).pow(2).sum()))


@pytest.mark.parametrize("mode", ["empirical", "affine", "auto"])
def test_a_sample_minmax_keeps_is_left_out_of_bias_correction(mode):
    """minmax keeps a corrupt sample (1e30 at the input) in its ranges, by definition; the float
    means of every later layer would follow it (δ ≈ 1e27). Bias correction leaves the flagged
    sample out: no bias of 1e27 is written, it says so, and the model is no worse than without
    bias correction. (A correction that would still hurt is rejected by the check: tested above
    on the check itself.)"""
    model = _mlp()
    g = torch.Generator().manual_seed(1)
    calib = torch.randn(256, 16, generator=g)
    calib[37, 5] = 1e30
    test = torch.randn(512, 16, generator=g)
    batches = [calib[i : i + 32] for i in range(0, 256, 32)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = ptqkit.quantize(model, batches, PTQConfig(calibration="minmax", bias_correction=mode))
        q0 = ptqkit.quantize(model, batches, PTQConfig(calibration="minmax", bias_correction=False))
    rec = q.ptq_info.details["bias_correction"]
    assert rec["left_out_samples"] == 1
    assert all(c["samples"] == 63 for c in rec["checked"].values())
    for name in rec["rejected"]:
        assert not rec["checked"][name]["kept"] and name not in rec["corrected"]
    written = [abs(v) for v in rec["corrected"].values()]
    assert written and all(v < 1e3 for v in written)  # no bias of 1e27 is written
    assert _sqnr(q, model, test) >= _sqnr(q0, model, test) - 0.5


@pytest.mark.parametrize("mode", ["empirical", "affine"])
def test_clean_data_corrections_are_checked_and_kept(mode):
    model = _mlp()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(32, 16, generator=g) for _ in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = ptqkit.quantize(model, batches, PTQConfig(bias_correction=mode))
    rec = q.ptq_info.details["bias_correction"]
    assert set(rec["checked"]) == set(rec["corrected"]) and not rec["rejected"]
    assert all(
        c["kept"] and c["mean_after"] <= c["mean_before"] * (1 + 1e-6)
        for c in rec["checked"].values()
    )


def test_the_left_out_sample_is_left_out_of_bias_correction_too():
    """The default config (mse, bias correction "auto") on data with a corrupt sample: the
    sample calibration left out is left out of the float means too, so the corrections are
    those of the clean data (within 1 dB of the clean model)."""
    model = _mlp()
    g = torch.Generator().manual_seed(3)
    calib = torch.randn(256, 16, generator=g)
    test = torch.randn(512, 16, generator=g)
    dirty = calib.clone()
    dirty[37, 5] = 1e30
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q_clean = ptqkit.quantize(
            model, [calib[i : i + 32] for i in range(0, 256, 32)], PTQConfig()
        )
        q = ptqkit.quantize(model, [dirty[i : i + 32] for i in range(0, 256, 32)], PTQConfig())
    rec = q.ptq_info.details["bias_correction"]
    assert rec["left_out_samples"] == 1 and rec["corrected"]
    assert max(rec["corrected"].values()) < 1.0
    assert abs(_sqnr(q, model, test) - _sqnr(q_clean, model, test)) <= 1.0
