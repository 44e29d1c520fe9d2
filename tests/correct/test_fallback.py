"""Automatic float fallback: a missed accuracy (or output-SQNR) target is met by keeping a few
layers in float, which are reported with the reason; an unreachable target ends with a clear
warning and the best state found, after a bounded number of passes."""

from __future__ import annotations

import pytest
import torch
from _sensitive import clear_inputs, sensitive_mlp
from torch import nn

import ptqkit
from ptqkit.correct.scoring import Evaluator
from ptqkit.quant.modules import quant_layers

LOW = ptqkit.PTQConfig(
    weights=ptqkit.QuantSpec(bits=3),
    activations=ptqkit.QuantSpec(bits=3, symmetric=False),
    progress=False,
)


#: 3-bit weights, 8-bit activations: on :func:`sensitive_mlp` only its layer "2" misses
W3 = ptqkit.PTQConfig(
    weights=ptqkit.QuantSpec(bits=3, per_channel=True),
    calibration="minmax",
    bias_correction=False,
    progress=False,
)


def test_meets_half_a_point():
    # a layer made sensitive on purpose (tests/_sensitive.py), inputs with clear float
    # decisions labelled by the float model: certain on any CPU, unlike a trained model's band
    model = sensitive_mlp()
    x = clear_inputs(model, 256, 8, seed=1)
    data = [(b, model(b).argmax(1)) for b in x.split(64)]
    plain = ptqkit.quantize(model, data, W3)
    ev = Evaluator(plain, data, W3)
    assert ev.float_metric == 100.0
    assert ev.float_metric - ev.measure().metric > 50  # misses the target without fallback
    q = ptqkit.quantize(model, data, W3.replace(max_degradation=0.5))
    d = q.ptq_info.details["fallback"]
    assert d["met"] and d["target"]["metric"] == "accuracy"
    assert [k["layer"] for k in d["kept_float"]] == ["2"]  # the sensitive layer, only it
    for k in d["kept_float"]:
        assert "left alone in float" in k["why"]
        assert not quant_layers(q)[k["layer"]].quantized
        for qn in k["quantizers"]:
            assert q.ptq_info.disabled[qn].startswith("fallback")
    ev = Evaluator(q, data, W3)
    assert ev.float_metric - ev.measure().metric <= 0.5
    assert d["passes"] <= 2 * 3 + 2


def test_sqnr_target_without_labels():
    model = sensitive_mlp()
    calib = list(clear_inputs(model, 256, 8, seed=1).split(64))
    q = ptqkit.quantize(model, calib, W3.replace(min_sqnr_db=15.0))
    d = q.ptq_info.details["fallback"]
    assert d["met"] and d["after"]["sqnr_db"] >= 15.0 > d["before"]["sqnr_db"]
    assert [k["layer"] for k in d["kept_float"]] == ["2"]
    x = torch.cat(calib)
    with torch.no_grad():
        assert ptqkit.quant.sqnr_db(model(x), q(x)) >= 15.0  # against the float model


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
