"""Automatic float fallback: a missed accuracy (or output-SQNR) target is met by keeping a few
layers in float, which are reported with the reason; an unreachable target ends with a clear
warning and the best state found, after a bounded number of passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.correct.scoring import Evaluator
from ptqkit.quant.modules import quant_layers

LOW = ptqkit.PTQConfig(
    weights=ptqkit.QuantSpec(bits=3),
    activations=ptqkit.QuantSpec(bits=3, symmetric=False),
    progress=False,
)


def _labeled(calib_batches, digits_data):
    y = digits_data[1]
    return [(x, y[i * 64 : (i + 1) * 64]) for i, x in enumerate(calib_batches)]


def test_meets_half_a_point(digits_cnn, calib_batches, digits_data):
    data = _labeled(calib_batches, digits_data)
    plain = ptqkit.quantize(digits_cnn, data, LOW)
    ev = Evaluator(plain, data, LOW)
    assert ev.float_metric - ev.measure().metric > 0.5  # misses the target without fallback
    q = ptqkit.quantize(digits_cnn, data, LOW.replace(max_degradation=0.5))
    d = q.ptq_info.details["fallback"]
    assert d["met"] and d["target"]["metric"] == "accuracy"
    kept = [k["layer"] for k in d["kept_float"]]
    assert 0 < len(kept) < 4
    for k in d["kept_float"]:
        assert "left alone in float" in k["why"]
        assert not quant_layers(q)[k["layer"]].quantized
        for qn in k["quantizers"]:
            assert q.ptq_info.disabled[qn].startswith("fallback")
    ev = Evaluator(q, data, LOW)
    assert ev.float_metric - ev.measure().metric <= 0.5
    assert d["passes"] <= 2 * 4 + 2


def test_sqnr_target_without_labels(digits_cnn, calib_batches):
    q = ptqkit.quantize(digits_cnn, calib_batches, LOW.replace(min_sqnr_db=15.0))
    d = q.ptq_info.details["fallback"]
    assert d["met"] and d["after"]["sqnr_db"] >= 15.0 > d["before"]["sqnr_db"]
    assert d["kept_float"]


def test_target_already_met_changes_nothing(digits_cnn, calib_batches):
    cfg = ptqkit.PTQConfig(min_sqnr_db=5.0, progress=False)
    q = ptqkit.quantize(digits_cnn, calib_batches, cfg)
    d = q.ptq_info.details["fallback"]
    assert d["met"] and d["kept_float"] == [] and d["passes"] == 1
    assert all(m.quantized for m in quant_layers(q).values())


class TwoHeads(nn.Module):
    """Two heads read the same pooled features: its quantizer belongs to no single layer, so
    it stays on even with every layer in float (the float network is out of reach)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head1, self.head2 = nn.Linear(8, 10), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.flatten(torch.mean(torch.relu(self.conv(x)), dim=(2, 3), keepdim=True), 1)
        return self.head1(h) + self.head2(h)


def test_unreachable_target_warns_and_keeps_best(calib_batches):
    cfg = LOW.replace(min_sqnr_db=200.0)
    with pytest.warns(ptqkit.PTQWarning, match="cannot be met even with every layer in float"):
        q = ptqkit.quantize(TwoHeads().eval(), calib_batches, cfg)
    d = q.ptq_info.details["fallback"]
    assert not d["met"]
    assert d["passes"] <= 2 * 3 + 2
    assert d["after"]["sqnr_db"] >= d["before"]["sqnr_db"]
