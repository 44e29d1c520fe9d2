"""Cross-layer equalization: the float function is unchanged (ReLU, ReLU6 with a scaled clip,
depthwise chains, conv → Linear through flatten, bias absorption), per-channel weight ranges are
equalized, shared activation modules are left alone, per-tensor weight quantization gets better,
and graphs without a pair are a logged no-op."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptqkit
from ptqkit.capture import prepare
from ptqkit.equalize.cle import ChannelClamp, equalize, find_pairs
from ptqkit.info import PTQInfo
from ptqkit.quant.modules import quant_layers
from ptqkit.quant.primitives import sqnr_db


def _bn(c: int, g: torch.Generator) -> nn.BatchNorm2d:
    """A BatchNorm with very uneven per-channel gains (what makes per-tensor INT8 fail)."""
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.exp(torch.randn(c, generator=g) * 1.5))
        bn.bias.copy_(torch.randn(c, generator=g) * 0.5 + 1.0)
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


class TinyMobile(nn.Module):
    """MobileNetV2-style: expand 1×1 → ReLU6 → depthwise 3×3 → ReLU6 → project 1×1, with one
    ReLU6 *module shared* by two uses (as EfficientNet-Lite's ``_swish``), a functional relu6,
    and a conv → pool → flatten → Linear head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn0 = _bn(8, g)
        self.expand = nn.Conv2d(8, 24, 1, bias=False)
        self.bn1 = _bn(24, g)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False)
        self.bn2 = _bn(24, g)
        self.act = nn.ReLU6()  # shared by expand and dw
        self.project = nn.Conv2d(24, 16, 1, bias=False)
        self.bn3 = _bn(16, g)
        self.head = nn.Conv2d(16, 32, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn0(self.stem(x)))
        x = self.act(self.bn1(self.expand(x)))
        x = self.act(self.bn2(self.dw(x)))
        x = self.bn3(self.project(x))
        x = torch.relu(self.head(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _prepared(model: nn.Module, **cfg) -> tuple[nn.Module, PTQInfo]:
    info = PTQInfo()
    return prepare(model, ptqkit.PTQConfig(progress=False, **cfg), info), info


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_float_function_unchanged_relu6_depthwise(digits_data):
    x = digits_data[0][:200]
    model = TinyMobile()
    with torch.no_grad():
        ref = model(x)
    qm, info = _prepared(model)
    equalize(qm, info)
    with torch.no_grad():
        out = qm(x)
    assert _rel(out, ref) < 1e-5
    d = info.details["cle"]
    pairs = {(p["first"], p["second"]) for p in d["pairs"]}
    assert {("stem", "expand"), ("expand", "dw"), ("dw", "project"), ("head", "fc")} <= pairs
    assert ("project", "head") in pairs  # identity activation
    assert d["absorbed_pairs"] >= 1  # dw → project (1×1, no padding) absorbs
    assert d["sweeps"] < 100
    # every ReLU6 use got its own clamp (modules() lists each module once), the shared ReLU6
    # module itself was never rescaled
    clamps = [m for m in qm.modules() if isinstance(m, ChannelClamp)]
    assert len(clamps) >= 3
    assert model.act.min_val == 0.0 and model.act.max_val == 6.0


def test_ranges_equalized(digits_data):
    qm, info = _prepared(TinyMobile())
    pairs, _ = find_pairs(qm)
    equalize(qm, info)
    layers = quant_layers(qm)
    for p in pairs:
        if p.second == "fc":
            continue  # the head pair is checked through its output below
        w1, w2 = layers[p.first].weight_fp, layers[p.second].weight_fp
        r1 = w1.reshape(w1.shape[0], -1).abs().amax(1)
        g = layers[p.second].layer.groups
        r2 = w2.reshape(g, w2.shape[0] // g, w2.shape[1], -1).abs().amax(dim=(1, 3)).reshape(-1)
        # the last sweep leaves each shared layer's ranges within the tolerance of its partner
        assert torch.allclose(r1, r2, rtol=5e-3), (p.first, p.second)


def test_idempotent_and_exact_twice(digits_data):
    x = digits_data[0][:100]
    model = TinyMobile(seed=1)
    with torch.no_grad():
        ref = model(x)
    qm, info = _prepared(model)
    equalize(qm, info)
    equalize(qm, info)  # clamps from the first run are rescaled, not stacked
    with torch.no_grad():
        assert _rel(qm(x), ref) < 1e-5
    assert max(abs(p["scale_max"] - 1) for p in info.details["cle"]["pairs"]) < 1e-2


def test_real_trained_model_unchanged(digits_cnn, digits_data):
    x = digits_data[2]
    with torch.no_grad():
        ref = digits_cnn(x)
    qm, info = _prepared(digits_cnn)
    equalize(qm, info)
    with torch.no_grad():
        assert _rel(qm(x), ref) < 1e-5
    assert [(p["first"], p["second"]) for p in info.details["cle"]["pairs"]] == [("conv3", "fc")]


def test_improves_per_tensor_weight_quantization(digits_data):
    """Per-tensor 8-bit weights (activations float): CLE raises the output SQNR a lot."""
    x = digits_data[0][:200]
    model = TinyMobile(seed=2)
    with torch.no_grad():
        ref = model(x)
    spec = ptqkit.QuantSpec(bits=8, per_channel=False)
    got = {}
    for cle in (False, True):
        cfg = ptqkit.PTQConfig(weights=spec, activations=None, cle=cle, progress=False)
        q = ptqkit.quantize(model, [x], cfg)
        with torch.no_grad():
            got[cle] = sqnr_db(ref, q(x))
    assert got[True] > got[False] + 6.0, got


def test_pipeline_records_and_keeps_accuracy(digits_cnn, calib_batches, test_batches):
    cfg = ptqkit.PTQConfig(cle=True, progress=False)
    q = ptqkit.quantize(digits_cnn, calib_batches, cfg)
    assert "cle" in q.ptq_info.stages and q.ptq_info.details["cle"]["pairs"]
    x, y = test_batches[0]
    with torch.no_grad():
        assert (q(x).argmax(1) == y).float().mean() > 0.9


class NoPair(nn.Module):
    """conv → add (the output has two users) → Linear: nothing to equalize."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.fc(torch.flatten(h + h.sigmoid(), 1))


def test_no_pair_is_logged_noop(digits_data):
    x = digits_data[0][:16]
    qm, info = _prepared(NoPair())
    before = copy.deepcopy(qm.state_dict())
    with pytest.warns(ptqkit.PTQWarning, match="no equalizable"):
        equalize(qm, info)
    assert info.details["cle"]["pairs"] == []
    assert "conv" in info.details["cle"]["not_paired"]
    for k, v in qm.state_dict().items():
        assert torch.equal(v, before[k])
    qm(x)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x.flatten(1))
        if h.sum() > 0:  # data-dependent control flow: fx cannot trace it
            h = h.relu()
        return self.b(h)


def test_untraceable_model_is_skipped_with_warning(digits_data):
    with pytest.warns(ptqkit.PTQWarning):
        qm, info = _prepared(Untraceable())
    with pytest.warns(ptqkit.PTQWarning, match="traced graph"):
        equalize(qm, info)
    assert info.details["cle"]["pairs"] == []


def test_channel_clamp_bounds():
    c = ChannelClamp(torch.tensor([0.0, -1.0]), torch.tensor([6.0, float("inf")]))
    x = torch.tensor([[-5.0, -5.0], [3.0, 3.0], [9.0, 9.0]]).reshape(3, 2, 1, 1)
    y = c(x).reshape(3, 2)
    assert torch.equal(y, torch.tensor([[0.0, -1.0], [3.0, 3.0], [6.0, 9.0]]))
