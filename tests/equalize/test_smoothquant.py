"""SmoothQuant: the scale formula, the three places the division goes (folded into a LayerNorm,
an explicit quantizer in the graph, an explicit quantizer inside the layer when the model cannot
be traced), an unchanged FP32 function in each case, and less error on outlier activations."""

from __future__ import annotations

import warnings

import _blocks as blocks
import pytest
import torch
from _blocks import outlier_norm
from torch import nn

import ptqkit
from ptqkit.equalize.smoothquant import SmoothedActQuant, smoothing_scale
from ptqkit.quant.modules import act_quants, float_mode
from ptqkit.quant.primitives import sqnr_db

D = 16


def _outlier_norm(dim: int = D) -> nn.LayerNorm:
    """A LayerNorm whose gain makes two channels ~30× larger, like real transformers'."""
    return outlier_norm(dim, (3, 11), 30.0)


class PreLN(nn.Module):
    """Pre-LN block: the LayerNorm output feeds only q, k, v (the division folds into it)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = _outlier_norm()
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.out = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return x + self.out(self.q(h) * self.k(h) + self.v(h))


class PostLN(blocks.PostLN):
    def __init__(self) -> None:
        super().__init__(D, 4 * D, _outlier_norm())


class Untraceable(blocks.UntraceablePostLN):
    def __init__(self) -> None:
        super().__init__(D, 4 * D, _outlier_norm())


def _model(cls: type) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def _data(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 5, D, generator=g) for _ in range(n)]


def _quantize(model: nn.Module, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ptqkit.PTQWarning)
        return ptqkit.quantize(model, _data(), ptqkit.PTQConfig(progress=False, **kw))


def _assert_fp32_unchanged(model: nn.Module, qmodel: nn.Module) -> None:
    x = torch.cat(_data(2))
    with torch.no_grad(), float_mode(qmodel):
        out, ref = qmodel(x), model(x)
    # float32 rounding only: the error is relative to the output's scale
    assert float((out - ref).abs().max()) <= 1e-6 * float(ref.abs().max()) + 1e-6


def test_scale_formula():
    x = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_scale(x, w, 0.5)  # sqrt(x) / sqrt(w); 1 where either is 0
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(smoothing_scale(x[:2], w[:2], 1.0), x[:2])  # α = 1: s = max|X|
    torch.testing.assert_close(smoothing_scale(x[:2], w[:2], 0.0), 1 / w[:2])  # α = 0: 1/max|W|


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_pre_ln_folds_into_layernorm(alpha):
    model = _model(PreLN)
    qmodel = _quantize(model, smoothquant=alpha)
    details = qmodel.ptq_info.details["smoothquant"]
    assert {n: details["layers"][n] for n in "qkv"} == {n: "folded into ln" for n in "qkv"}
    assert details["extra_data_pass_batches"] == 4
    assert not torch.equal(qmodel.ln.weight, model.ln.weight)
    # `out` reads an add: not a normalization's output, not smoothed
    assert details["layers"]["out"].startswith("not smoothed")
    assert not any(isinstance(q, SmoothedActQuant) for q in act_quants(qmodel).values())
    _assert_fp32_unchanged(model, qmodel)
    assert details["fp32_max_rel_change"] < 1e-5


class PreRMS(nn.Module):
    """Pre-norm block with an RMSNorm (LLaMA style): a gain, no bias, to fold ``1/s`` into."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(D)
        with torch.no_grad():
            self.norm.weight.copy_(_outlier_norm().weight)
        self.q, self.k = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.q(h) * self.k(h)


def test_pre_rmsnorm_folds_into_its_gain():
    model = _model(PreRMS)
    qmodel = _quantize(model, smoothquant=0.5)
    details = qmodel.ptq_info.details["smoothquant"]
    assert details["layers"] == {"q": "folded into norm", "k": "folded into norm"}
    assert not torch.equal(qmodel.norm.weight, model.norm.weight)
    _assert_fp32_unchanged(model, qmodel)


@pytest.mark.parametrize("cls", [PostLN, Untraceable])
def test_explicit_scale_when_nothing_absorbs_it(cls):
    model = _model(cls)
    qmodel = _quantize(model, smoothquant=0.5)
    info = qmodel.ptq_info
    assert info.traced == (cls is PostLN)
    layers = info.details["smoothquant"]["layers"]
    assert layers["fc1"] == "explicit scale" and layers["fc2"].startswith("not smoothed")
    torch.testing.assert_close(qmodel.ln.weight, model.ln.weight)  # LayerNorm left alone
    smoothed = [q for q in act_quants(qmodel).values() if isinstance(q, SmoothedActQuant)]
    assert len(smoothed) == 1 and smoothed[0].calibrated
    if cls is Untraceable:
        assert isinstance(qmodel.fc1.input_quant, SmoothedActQuant)
    _assert_fp32_unchanged(model, qmodel)


def test_outlier_channels_quantize_better():
    # untraced, as MiniLM: only the Linears' inputs are quantized, so the outliers that
    # SmoothQuant removes are the whole error
    model = _model(Untraceable)
    x = torch.cat(_data(2))
    with torch.no_grad():
        ref = model(x)
        plain, smooth = _quantize(model), _quantize(model, smoothquant=0.5)
        gain = sqnr_db(ref, smooth(x)) - sqnr_db(ref, plain(x))
    assert gain > 3.0  # dB (measured: 6.1)
    width = lambda q: float(q.range[1] - q.range[0])  # noqa: E731
    assert width(smooth.fc1.input_quant) < 0.5 * width(plain.fc1.input_quant)


@pytest.mark.filterwarnings("ignore:only .* calibration samples")
def test_no_normalization_nothing_smoothed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D)).eval()
    with pytest.warns(ptqkit.PTQWarning, match="nothing smoothed"):
        qmodel = ptqkit.quantize(model, _data(), ptqkit.PTQConfig(smoothquant=0.5, progress=False))
    assert not any(isinstance(q, SmoothedActQuant) for q in act_quants(qmodel).values())


def test_without_activation_quantization_is_a_noop():
    model = _model(PreLN)
    with pytest.warns(ptqkit.PTQWarning, match="smoothquant has no effect"):
        qmodel = ptqkit.quantize(
            model, _data(), ptqkit.PTQConfig(activations=None, smoothquant=0.5, progress=False)
        )
    torch.testing.assert_close(qmodel.ln.weight, model.ln.weight)


def test_zero_channels_keep_scale_one():
    model = _model(Untraceable)
    with torch.no_grad():
        model.fc1.weight[:, 5] = 0.0  # a dead input channel
    qmodel = _quantize(model, smoothquant=0.5)
    assert float(qmodel.fc1.input_quant.inv_scale[5]) == 1.0
    _assert_fp32_unchanged(model, qmodel)


def test_config_rejects_bad_alpha():
    with pytest.raises(ptqkit.ConfigError):
        ptqkit.PTQConfig(smoothquant=1.5)
