"""Group-wise weight quantization (QuantSpec.group_size): the fake-quant against a hand-written
reference, a last short group, validation, and a weight-only W4 g-wise model end to end."""

import math

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.calibrate.weights import weight_range
from ptqkit.config import PTQConfig, QuantSpec
from ptqkit.errors import ConfigError
from ptqkit.quant.modules import QuantLayer, quant_layers


def _reference(w: torch.Tensor, bits: int, g: int, symmetric: bool) -> torch.Tensor:
    """Element by element: each group of g consecutive inputs of a row, min/max range."""
    out = torch.empty_like(w)
    flat, res = w.reshape(w.shape[0], -1), out.reshape(w.shape[0], -1)
    for o in range(flat.shape[0]):
        for start in range(0, flat.shape[1], g):
            seg = flat[o, start : start + g]
            lo, hi = seg.min().clamp(max=0.0), seg.max().clamp(min=0.0)  # float32, as qparams
            if symmetric:
                qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
                s32, z = torch.maximum(-lo, hi) / qmax, torch.tensor(0.0)
            else:
                qmin, qmax = 0, 2**bits - 1
                s32 = (hi - lo) / qmax
                z = torch.clamp(torch.round(-lo / s32), qmin, qmax)  # round-half-even
            q = torch.clamp(torch.round(seg / s32) + z, qmin, qmax)
            res[o, start : start + g] = (q - z) * s32
    return out


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    ("layer", "g"),
    [
        (lambda: nn.Linear(96, 5), 32),
        (lambda: nn.Linear(100, 3), 32),
        (lambda: nn.Conv2d(6, 4, 3), 16),
    ],
)
def test_fake_quant_matches_reference(layer, g: int, symmetric: bool) -> None:
    torch.manual_seed(0)
    layer = layer()
    w = layer.weight.detach().clone()
    spec = QuantSpec(bits=4, symmetric=symmetric, per_channel=True, group_size=g)
    q = QuantLayer(layer, spec, "layer")
    q.set_weight_range(*weight_range(q, "minmax"))
    k = w[0].numel()
    assert tuple(q.weight_scale.shape) == (w.shape[0], math.ceil(k / g))  # last group shorter
    assert q.weight_int.shape == w.shape
    assert torch.equal(q.weight, _reference(w, 4, g, symmetric))


def test_groups_beat_per_channel_on_outlier_group() -> None:
    """One large group per row: per-channel's scale is set by it, a group's is not."""
    torch.manual_seed(1)
    w = torch.randn(8, 256) * 0.01
    w[:, :32] *= 100
    err = {}
    for g in (None, 32):
        lin = nn.Linear(256, 8)
        lin.weight.data = w.clone()
        q = QuantLayer(lin, QuantSpec(bits=4, per_channel=True, group_size=g), "fc")
        q.set_weight_range(*weight_range(q, "minmax"))
        err[g] = float((q.weight[:, 32:] - w[:, 32:]).pow(2).sum())
    assert err[32] < err[None] / 100


def test_mse_groups_not_worse_than_minmax() -> None:
    torch.manual_seed(2)
    lin = nn.Linear(200, 16)
    errs = {}
    for method in ("minmax", "mse"):
        q = QuantLayer(nn.Linear(200, 16), QuantSpec(bits=3, per_channel=True, group_size=64), "")
        q.set_float_weight(lin.weight)
        q.set_weight_range(*weight_range(q, method))
        errs[method] = float((q.weight - lin.weight.detach()).pow(2).sum())
    assert errs["mse"] <= errs["minmax"]


def test_bad_specs() -> None:
    with pytest.raises(ConfigError, match="per_channel=True"):
        QuantSpec(bits=4, group_size=128)
    for bad in (1, 0, -8, 2.5, True, "128"):
        with pytest.raises(ConfigError, match="group_size"):
            QuantSpec(bits=4, per_channel=True, group_size=bad)
    with pytest.raises(ConfigError, match="weights only"):
        PTQConfig(activations=QuantSpec(per_channel=True, group_size=32))
    with pytest.raises(ConfigError, match="ConvTranspose2d"):
        QuantLayer(nn.ConvTranspose2d(4, 4, 3), QuantSpec(4, True, True, group_size=8), "up")
    spec = QuantSpec(bits=4, per_channel=True, group_size=64)
    assert QuantSpec.from_dict(spec.to_dict()) == spec


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 256)
        self.down = nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def test_weight_only_w4_groupwise_mlp() -> None:
    """activations=None, W4 g32 on a transformer-style MLP: activations stay float, every layer
    group-wise; the output is that of the model with the dequantized weights, and closer to
    FP32 than per-channel W4."""
    torch.manual_seed(3)
    model = _MLP().eval()
    data = [torch.randn(8, 16, 64) for _ in range(4)]
    x = torch.randn(4, 16, 64)
    ref = model(x)
    err = {}
    for g in (None, 32):
        w = QuantSpec(bits=4, per_channel=True, group_size=g)
        q = ptqkit.quantize(model, data, PTQConfig(weights=w, activations=None, progress=False))
        assert not ptqkit.quant.modules.act_quants(q) or all(
            a.mode == "off" for a in ptqkit.quant.modules.act_quants(q).values()
        )
        layers = quant_layers(q)
        assert len(layers) == 2
        if g:
            assert {tuple(m.weight_scale.shape) for m in layers.values()} == {(256, 2), (64, 8)}
        manual = _MLP()
        manual.load_state_dict(model.state_dict())
        manual.up.weight.data = layers["up"].weight.clone()
        manual.down.weight.data = layers["down"].weight.clone()
        manual.up.bias.data = layers["up"].layer.bias.detach().clone()
        manual.down.bias.data = layers["down"].layer.bias.detach().clone()
        with torch.no_grad():
            out = q(x)
            assert torch.allclose(out, manual(x), atol=1e-6)
        err[g] = float((out - ref).pow(2).mean())
    assert err[32] < err[None]
