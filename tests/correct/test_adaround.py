"""AdaRound: each weight is rounded down or up (never further), the layer's reconstruction error
falls below nearest rounding's, 3-bit weights keep the digits CNN usable, memory is bounded by
the row budget, and layers that never run fall back to nearest rounding with a warning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.config import AdaRoundOptions
from ptqkit.correct import adaround as ar
from ptqkit.correct import patches as patches_mod
from ptqkit.info import PTQInfo
from ptqkit.quant.modules import QuantLayer
from ptqkit.quant.primitives import qparams, sqnr_db

W3 = ptqkit.QuantSpec(bits=3, per_channel=True)


def _acc(model: nn.Module, batches) -> float:
    hit = n = 0
    with torch.no_grad():
        for x, y in batches:
            hit += int((model(x).argmax(1) == y).sum())
            n += len(y)
    return 100.0 * hit / n


def test_round_layer_up_or_down_and_better_than_nearest():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    layer = QuantLayer(lin, ptqkit.QuantSpec(bits=3, per_channel=True))
    w = layer.weight_fp
    lo, hi = w.amin(1), w.amax(1)
    scale, zp = qparams(lo, hi, layer.spec)
    # correlated inputs (as real activations are): nearest rounding is far from optimal there
    x = torch.randn(2048, 6) @ torch.randn(6, 32) + 0.1 * torch.randn(2048, 32)
    target = x @ w.T + lin.bias
    q, losses = ar.round_layer(layer, scale, zp, x.unsqueeze(1), target, None, 200, seed=0)
    ws = w / scale[:, None]
    assert bool(((q.float() >= torch.floor(ws) - 1e-6) & (q.float() <= torch.floor(ws) + 1)).all())
    assert q.float().min() >= layer.spec.qmin and q.float().max() <= layer.spec.qmax
    assert losses["adaround"] < 0.8 * losses["nearest"], losses


def test_w3_digits_adaround_beats_nearest(digits_cnn, calib_batches, test_batches):
    base = ptqkit.PTQConfig(weights=W3, progress=False, adaround_iters=200)
    nearest = ptqkit.quantize(digits_cnn, calib_batches, base)
    learned = ptqkit.quantize(digits_cnn, calib_batches, base.replace(adaround=True))
    d = learned.ptq_info.details["adaround"]["layers"]
    assert set(d) == {"conv1", "conv2", "conv3", "fc"}
    # on its own objective (the layer's output on its calibration rows) the rounding kept is
    # never worse than nearest: AdaRound's hard rounding may lose (fc: 2.48 vs 2.41 on the CNN
    # trained with mkldnn off), then nearest's is kept and recorded (issue 27: not a band)
    for name, r in d.items():
        kept = r["nearest"] if r.get("kept") == "nearest" else r["adaround"]
        assert kept <= r["nearest"], name
        if r.get("kept") == "nearest":
            assert torch.equal(learned.get_submodule(name).weight_int,
                               nearest.get_submodule(name).weight_int), name
    assert any(r["adaround"] < 0.9 * r["nearest"] for r in d.values()), d
    # and the model carries what was learned: closer to the FP32 outputs than nearest rounding
    x = torch.cat(calib_batches)
    with torch.no_grad():
        f = digits_cnn(x)
        assert sqnr_db(f, learned(x)) > sqnr_db(f, nearest(x))
    assert "adaround" in learned.ptq_info.stages


def test_row_budget_bounds_memory(digits_cnn, calib_batches):
    opts = AdaRoundOptions(max_rows=300, rows_per_batch=128)
    cfg = ptqkit.PTQConfig(
        weights=W3, adaround=True, adaround_iters=20, progress=False, adaround_options=opts
    )
    q = ptqkit.quantize(digits_cnn, calib_batches, cfg)
    rows = [r["rows"] for r in q.ptq_info.details["adaround"]["layers"].values()]
    assert max(rows) <= 300
    assert rows[0] == 300  # conv1: 64 images × 64 positions per batch, 128 + 128 + 44 kept


class Unused(nn.Module):
    """Untraceable (data-dependent branch), with a Linear that never runs on the digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.spare = nn.Linear(4 * 64, 4 * 64)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.flatten(torch.relu(self.conv(x)), 1)
        if h.abs().max() > 1e9:
            h = self.spare(h)
        return self.fc(h)


def test_layer_never_run_falls_back_to_nearest(calib_batches):
    torch.manual_seed(0)
    cfg = ptqkit.PTQConfig(weights=W3, adaround=True, adaround_iters=10, progress=False)
    with pytest.warns(ptqkit.PTQWarning, match="spare never ran"):
        q = ptqkit.quantize(Unused().eval(), calib_batches, cfg)
    d = q.ptq_info.details["adaround"]["layers"]
    assert "skipped" in d["spare"] and "nearest" in d["conv"] and "nearest" in d["fc"]
    assert q.spare.quantized


def test_no_layers_is_a_warning(calib_batches):
    with pytest.warns(ptqkit.PTQWarning, match="no layer with weights"):
        ar.adaround(nn.Sequential(nn.ReLU()), calib_batches, ptqkit.PTQConfig(), PTQInfo())


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(6, 8, 3, padding=1, stride=2),
        nn.Conv2d(6, 6, (3, 5), padding=(2, 1), dilation=(2, 1), groups=6),
        nn.Conv2d(6, 4, 1),
    ],
)
def test_gathered_patches_equal_identity_kernel_patches(conv, monkeypatch):
    torch.manual_seed(0)
    layer = QuantLayer(conv, ptqkit.QuantSpec())
    x = torch.randn(3, 6, 9, 11)
    y = layer.layer(x)
    per = y.shape[2] * y.shape[3]
    rows = torch.randperm(3 * per)[:40].sort().values
    gathered = patches_mod.patches(layer.layer, x, rows, per)
    monkeypatch.setattr(patches_mod, "gather_patches", lambda *a: None)
    generic = patches_mod.patches(layer.layer, x, rows, per)
    assert torch.equal(gathered, generic)
    # and they reproduce the conv: patches · weight = output at those rows
    g = conv.groups
    w = layer.weight_fp.reshape(g, -1, gathered.shape[2])
    out = torch.einsum("bgk,gok->bgo", gathered, w).reshape(len(rows), -1) + conv.bias
    ref = y.movedim(1, -1).reshape(-1, y.shape[1])[rows]
    assert torch.allclose(out, ref, atol=1e-5)
