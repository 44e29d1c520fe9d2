"""Layer-wise sensitivity: one row per layer with SQNR and metric when only that layer is
quantized / left in float, labels optional, the model left as it was."""

from __future__ import annotations

import math

import pytest
import torch

import ptqkit
from ptqkit.analysis.sensitivity import layer_sqnr
from ptqkit.correct.units import layer_quantizers, precision
from ptqkit.quant.modules import act_quants, quant_layers

LOW = ptqkit.PTQConfig(
    calibration="minmax",
    bias_correction=False,
    weights=ptqkit.QuantSpec(bits=3),
    activations=ptqkit.QuantSpec(bits=4, symmetric=False),
    progress=False,
)


def test_units_of_the_digits_cnn(quantized_digits):
    units = layer_quantizers(quantized_digits)
    assert set(units["conv1"]) == {"aq_relu1", "aq_in_x"}  # output after ReLU, exclusive input
    assert units["conv2"] == ["aq_conv2"]  # its input feeds the residual add too: not its own
    assert units["fc"] == ["aq_in_flatten"]  # the network output itself is not quantized


def test_report_with_labels(digits_cnn, test_batches):
    rep = ptqkit.sensitivity(digits_cnn, test_batches, LOW)
    assert rep.metric == "accuracy" and rep.samples == 360
    assert [r.name for r in rep.layers] == ["conv1", "conv2", "conv3", "fc"]
    for r in rep.layers:
        assert math.isfinite(r.sqnr_db) and 0 <= r.only_float <= 100
        assert 0 <= r.only_quantized <= 100 and r.params > 0
    # quantizing one layer alone costs less than quantizing all of them
    assert min(r.only_quantized for r in rep.layers) >= rep.quant_metric
    ranked = rep.ranked()
    assert ranked[0].only_float == max(r.only_float for r in rep.layers)
    text = rep.table()
    assert "conv1" in text and "accuracy" in text
    d = rep.to_dict()
    assert d["layers"][0]["name"] == "conv1"


def test_report_without_labels_is_agreement(digits_cnn, calib_batches):
    rep = ptqkit.sensitivity(digits_cnn, calib_batches, LOW)
    assert rep.metric == "agreement" and rep.float_metric == 100.0
    assert all(0 <= r.only_float <= 100 for r in rep.layers)


def test_quantized_model_is_measured_and_left_as_it_was(digits_cnn, calib_batches):
    q = ptqkit.quantize(digits_cnn, calib_batches, LOW)
    x = calib_batches[0]
    with torch.no_grad():
        before = q(x)
    modes = {n: m.mode for n, m in act_quants(q).items()}
    rep = ptqkit.sensitivity(q, calib_batches, LOW)
    with torch.no_grad():
        assert torch.equal(q(x), before)
    assert {n: m.mode for n, m in act_quants(q).items()} == modes
    assert all(m.quantized for m in quant_layers(q).values())
    assert len(rep.layers) == 4


def test_precision_states(digits_cnn, calib_batches):
    q = ptqkit.quantize(digits_cnn, calib_batches, LOW)
    x = calib_batches[0]
    with torch.no_grad():
        ref = digits_cnn(x)
        with precision(q, floats=list(quant_layers(q))):
            assert torch.allclose(q(x), ref, atol=1e-4)  # every unit float: the float network
        with precision(q, only=["conv2"]):
            assert not q.conv1.quantized and q.conv2.quantized and q.aq_in_x.mode == "off"
    assert q.conv1.quantized and q.aq_in_x.mode == "quant"


def test_layer_sqnr_is_streamed_in_slices(digits_cnn, calib_batches, monkeypatch):
    import ptqkit.analysis.sensitivity as sens

    q = ptqkit.quantize(digits_cnn, calib_batches, LOW)
    whole = layer_sqnr(q, calib_batches, LOW)
    monkeypatch.setattr(sens, "SQNR_BUDGET", 1)  # one sample at a time
    sliced = layer_sqnr(q, calib_batches, LOW)
    for n in whole:
        assert abs(whole[n] - sliced[n]) < 1e-4  # float32 sums of other batch sizes: ~1e-6 dB
    assert whole["conv1"] > whole["fc"]  # error accumulates with depth


def test_units_see_cle_clamps(digits_data):
    """After CLE a ReLU6 is a per-channel clamp: still the activation before the quantizer."""
    from torch import nn

    from ptqkit.equalize.cle import ChannelClamp

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU6(),
        nn.Conv2d(8, 4, 1),
        nn.Flatten(),
        nn.Linear(256, 3),
    ).eval()
    x = digits_data[0][:64]
    q = ptqkit.quantize(model, [x], ptqkit.PTQConfig(cle=True, progress=False))
    assert any(isinstance(m, ChannelClamp) for m in q.modules())
    units = layer_quantizers(q)
    assert len(units["0"]) == 2  # its output (after the clamp) and the model input


def test_in_place_ops_in_the_model_cannot_corrupt_what_sensitivity_keeps():
    """The model adds into and rectifies a layer's output in place, and rectifies its own input
    in place: the kept float references and the batches must not change under it."""
    from torch import nn

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            x.add_(0.5)  # touches the caller's tensor
            out = self.a(x)
            out.add_(self.b(x))
            if x.sum() > -1e30:  # untraceable: the hooks capture runs this very forward
                out.relu_()
            h = self.c(out)
            h.mul_(2.0)
            return h

    g = torch.Generator().manual_seed(0)
    model = InPlace().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    data = [torch.randn(64, 8, generator=g) for _ in range(2)]
    cfg = ptqkit.PTQConfig(calibration="minmax", bias_correction=False, progress=False)
    with pytest.warns(ptqkit.PTQWarning):  # captured with hooks
        q = ptqkit.quantize(model, data, cfg)
    before = [x.clone() for x in data]  # (what quantize's own passes do to it is not checked here)
    assert not isinstance(q, torch.fx.GraphModule)
    sq = layer_sqnr(q, data, cfg)
    # the reference: hooks on fresh copies, compared right away (nothing kept across ops)
    want = {}
    for n, layer in quant_layers(q).items():
        sig = noise = 0.0
        got: dict = {}
        for x in data:
            h = layer.register_forward_hook(lambda m, a, y, got=got: got.update(y=y.clone()))
            with torch.no_grad(), ptqkit.quant.modules.float_mode(q):
                q(x.clone())
            ref = got.pop("y").double()
            with torch.no_grad():
                q(x.clone())
            h.remove()
            sig += float(ref.pow(2).sum())
            noise += float((ref - got.pop("y").double()).pow(2).sum())
        want[n] = 10 * math.log10(sig / noise)
    for n in want:
        assert abs(sq[n] - want[n]) < 1e-6, (n, sq[n], want[n])
    rep = ptqkit.sensitivity(q, data, cfg)
    assert all(torch.equal(a, b) for a, b in zip(data, before))
    assert rep.metric == "agreement" and rep.float_metric == 100.0
    # the full quantized agreement equals what a direct comparison of fresh runs gives
    agree = n = 0
    for x in data:
        with torch.no_grad():
            with ptqkit.quant.modules.float_mode(q):
                ref = q(x.clone())
            out = q(x.clone())
        agree += int((out.argmax(1) == ref.argmax(1)).sum())
        n += len(x)
    assert rep.quant_metric == 100.0 * agree / n
