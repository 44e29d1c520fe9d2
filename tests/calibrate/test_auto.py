"""``calibration="auto"``: every calibrated quantizer gets the registered calibrator whose range
gives the least error at the consuming layers' outputs; the choice is recorded, and user-registered
histogram calibrators take part."""

from __future__ import annotations

import torch

import ptqkit
from ptqkit.calibrate import CALIBRATORS, calibrators, register_calibrator
from ptqkit.calibrate.auto import AUTO_BATCHES, candidate_ranges
from ptqkit.calibrate.calibrators import MSECalibrator
from ptqkit.quant.modules import act_quants

A4 = ptqkit.QuantSpec(bits=4, symmetric=False)


def test_candidates_are_the_histogram_solvers():
    cal = MSECalibrator()
    cal.observe(torch.randn(4096))
    got = candidate_ranges(cal, A4)
    assert {"minmax", "percentile", "kl", "mse", "auto_percentile"} <= set(got)
    assert "ema" not in got  # needs the batch sequence, not a histogram
    lo, hi = got["minmax"]
    assert float(lo) == float(cal.stats.lo.min()) and float(hi) == float(cal.stats.hi.max())


def test_auto_chooses_the_least_error_and_records_it(digits_cnn, calib_batches, test_batches):
    cfg = ptqkit.PTQConfig(activations=A4, calibration="auto", progress=False)
    q = ptqkit.quantize(digits_cnn, calib_batches, cfg)
    info = q.ptq_info
    quants = act_quants(q)
    assert set(info.chosen) == set(quants)
    d = info.details["auto"]
    assert d["batches"] == min(AUTO_BATCHES, len(calib_batches))
    assert d["scored_on"]["aq_relu1"] == "layer outputs"  # read by conv2
    for name, choice in info.chosen.items():
        errs = d["errors"][name]
        assert choice in CALIBRATORS and errs[choice] == min(errs.values())
    # the quantizer's range is the chosen calibrator's
    cal_cfg = ptqkit.PTQConfig(activations=A4, calibration=info.chosen["aq_relu1"], progress=False)
    single = ptqkit.quantize(digits_cnn, calib_batches, cal_cfg)
    assert torch.allclose(q.aq_relu1.scale, single.aq_relu1.scale)
    # and it is no worse than minmax on the held-out digits
    mm = ptqkit.quantize(digits_cnn, calib_batches, cfg.replace(calibration="minmax"))
    x, y = test_batches[0]
    with torch.no_grad():
        assert (q(x).argmax(1) == y).float().mean() >= (mm(x).argmax(1) == y).float().mean() - 0.02


def test_user_registered_histogram_calibrator_takes_part(digits_cnn, calib_batches):
    class Tight(MSECalibrator):
        """A deliberately poor choice (half the MSE range): never the best."""

        name = "tight_test"

        def _solve(self, spec):
            lo, hi = super()._solve(spec)
            return lo / 2, hi / 2

    register_calibrator("tight_test", Tight)
    try:
        cfg = ptqkit.PTQConfig(activations=A4, calibration="auto", progress=False)
        q = ptqkit.quantize(digits_cnn, calib_batches, cfg)
        errs = q.ptq_info.details["auto"]["errors"]
        assert all("tight_test" in e for e in errs.values())
        assert "tight_test" not in q.ptq_info.chosen.values()
    finally:
        calibrators._REGISTRY.pop("tight_test")


def test_per_channel_activations_scored_on_tensor(digits_cnn, calib_batches, monkeypatch):
    """Per-channel activation grids do not commute with flatten: scored on the tensor."""
    for slow in ("kl", "auto_percentile"):  # per-channel KL loops over channels: keep it short
        monkeypatch.delitem(calibrators._REGISTRY, slow)
    spec = ptqkit.QuantSpec(bits=8, symmetric=False, per_channel=True, axis=1)
    cfg = ptqkit.PTQConfig(activations=spec, calibration="auto", progress=False)
    q = ptqkit.quantize(digits_cnn, calib_batches, cfg)
    assert set(q.ptq_info.details["auto"]["scored_on"].values()) == {"tensor"}
    assert q.aq_relu1.scale.numel() == 16
