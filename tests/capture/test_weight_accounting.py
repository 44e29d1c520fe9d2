"""Coverage: ConvTranspose and parametrized layers are quantized, every other module holding
weights is listed as float with a reason, and one warning sums them up."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

import ptqkit
from ptqkit import ModelError, PTQConfig, PTQWarning
from ptqkit.capture import fold_bn_into
from ptqkit.quant import sqnr_db
from ptqkit.quant.modules import QuantLayer, quant_layers

CFG = PTQConfig(progress=False)


def _data(shape, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _random_bn(c: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(1)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) * 2 - 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.1)
    return bn.eval()


def _sqnr(m, q, x):
    with torch.no_grad():
        return sqnr_db(m(x), q(x))


# -- ConvTranspose -------------------------------------------------------------------------------
class Decoder(nn.Module):
    def __init__(self, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=groups)
        self.bn = _random_bn(8)
        self.head = nn.ConvTranspose2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.up(F.relu(self.conv(x))))))


class Decoder1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose1d(3, 6, 3, stride=2, groups=3)
        self.out = nn.Conv1d(6, 4, 1)

    def forward(self, x):
        return self.out(F.relu(self.up(x)))


class Decoder3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose3d(3, 6, 2, stride=2)
        self.out = nn.Conv3d(6, 4, 1)

    def forward(self, x):
        return self.out(F.relu(self.up(x)))


@pytest.mark.parametrize(
    ("make", "shape"),
    [(Decoder, (16, 3, 8, 8)), (lambda: Decoder(groups=4), (16, 3, 8, 8)),
     (Decoder1d, (16, 3, 16)), (Decoder3d, (8, 3, 4, 4, 4))],
)
def test_conv_transpose_is_quantized_per_output_channel(make, shape):
    torch.manual_seed(0)
    m = make().eval()
    data = _data(shape)
    q = ptqkit.quantize(m, data, CFG)
    info = q.ptq_info
    ups = {n: lay for n, lay in quant_layers(q).items() if isinstance(lay.layer, nn.ConvTranspose1d
           | nn.ConvTranspose2d | nn.ConvTranspose3d)}
    assert ups and set(ups) <= set(info.layers) and info.skipped == []
    for layer in ups.values():
        w = layer.weight_fp
        assert layer.spec.axis == 1 and layer.weight_scale.shape == (w.shape[1],)
        assert layer.weight_int.dtype == torch.int8 and layer.quantized
    assert _sqnr(m, q, _data(shape, n=1, seed=1)[0]) >= 30


def test_batchnorm_after_a_grouped_conv_transpose_is_folded_exactly():
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(8, 12, 3, stride=2, groups=4).eval()
    bn = _random_bn(12)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        want = bn(up(x))
        fold_bn_into(up, bn)
        torch.testing.assert_close(up(x), want, rtol=1e-5, atol=1e-5)
    q = ptqkit.quantize(Decoder(groups=4).eval(), _data((16, 3, 8, 8)), CFG)
    assert q.ptq_info.folded_bn == ["bn"] and q.ptq_info.capture_error < 1e-4


# -- parametrized layers -------------------------------------------------------------------------
class Symmetric(nn.Module):
    def forward(self, w):
        return (w + w.t()) / 2


class Parametrized(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = weight_norm(nn.Conv2d(3, 8, 3, padding=1))
        self.mid = nn.Linear(8, 8)
        parametrize.register_parametrization(self.mid, "weight", Symmetric())
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(F.relu(self.mid(F.relu(self.conv(x)).mean((2, 3)))))


def test_parametrized_layers_are_quantized_on_their_effective_weight():
    torch.manual_seed(0)
    m = Parametrized().eval()
    data = _data((16, 3, 8, 8))
    q = ptqkit.quantize(m, data, CFG)
    assert sorted(q.ptq_info.layers) == ["conv", "mid", "out"]
    removed = ["conv.weight (_WeightNorm)", "mid.weight (Symmetric)"]
    assert q.ptq_info.details["unparametrized"] == removed
    w = q.get_submodule("mid").weight_fp
    torch.testing.assert_close(w, w.t())  # the effective (symmetric) weight is what is quantized
    x = _data((16, 3, 8, 8), n=1, seed=1)[0]
    assert _sqnr(m, q, x) >= 30
    assert parametrize.is_parametrized(m.mid) and parametrize.is_parametrized(m.conv)
    with torch.no_grad():
        m(x)  # the user's model still runs: its parametrizations were removed on the copy only


def test_deprecated_weight_norm_that_cannot_be_copied_is_a_model_error():
    m = nn.Sequential(nn.utils.weight_norm(nn.Conv2d(3, 4, 3)), nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(ModelError, match=r"0 uses the deprecated torch.nn.utils.weight_norm"):
        ptqkit.quantize(m, _data((4, 3, 4, 4)), CFG)


# -- coverage ------------------------------------------------------------------------------------
class WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.fc = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, ids):
        return self.head(self.norm(F.relu(self.fc(self.emb(ids).mean(1)))))


def test_every_module_with_weights_is_quantized_or_listed_with_a_reason():
    torch.manual_seed(0)
    m = WithEmbedding().eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 100, (32, 5), generator=g) for _ in range(4)]
    warned = r"2 layers holding 93% of the weights stay float: emb \(Embedding"
    with pytest.warns(PTQWarning, match=warned):
        q = ptqkit.quantize(m, data, CFG.replace(skip=("head",)))
    info = q.ptq_info
    assert info.layers == ["fc"] and info.skipped == ["head", "emb"]
    assert info.skip_reasons == {
        "head": "matches skip pattern 'head'",
        "emb": "Embedding: ptqkit quantizes only Conv, ConvTranspose and Linear weights",
    }
    with torch.no_grad():
        assert sqnr_db(m(data[0]), q(data[0])) >= 30


def test_zoo_digits_cnn_is_fully_covered(digits_cnn, calib_batches):
    q = ptqkit.quantize(digits_cnn, calib_batches, CFG)
    info = q.ptq_info
    kinds = (nn.Conv2d, nn.Linear)
    weighted = [n for n, mod in digits_cnn.named_modules() if isinstance(mod, kinds)]
    assert sorted(info.layers + info.skipped) == sorted(weighted) and info.skipped == []
    assert all(isinstance(q.get_submodule(n), QuantLayer) for n in info.layers)


@pytest.mark.parametrize("stage", ["cle", "adaround"])
def test_stages_assuming_the_conv_weight_layout_refuse_conv_transpose(stage):
    torch.manual_seed(0)
    with pytest.raises(ModelError, match=rf"{stage} does not support ConvTranspose .*\(up, head\)"):
        ptqkit.quantize(Decoder().eval(), _data((16, 3, 8, 8)), CFG.replace(**{stage: True}))
    cfg = CFG.replace(cle=True, skip=("up", "head"))
    q = ptqkit.quantize(Decoder().eval(), _data((16, 3, 8, 8)), cfg)
    assert q.ptq_info.skipped == ["up", "head"] and q.ptq_info.capture_checks["CLE"] < 1e-4
