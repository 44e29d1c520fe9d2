"""Empirical bias correction and AdaRound on cached layer inputs (one quantized pass,
``ptqkit.walk.propagate``) give the same model as the previous implementations, which re-ran the
network prefix for every layer; those are kept here, verbatim in substance, as the reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.calibrate.weights import weight_range
from ptqkit.config import BiasCorrectionOptions
from ptqkit.correct import adaround as ar
from ptqkit.correct.bias import _add_to_bias, correct_bias
from ptqkit.correct.samples import collect_prefix
from ptqkit.graph import activation_after
from ptqkit.info import PTQInfo
from ptqkit.quant.modules import float_mode, quant_layers
from ptqkit.quant.primitives import qparams
from ptqkit.walk import batches, layer_order, run_until, stop_after


class Branchy(nn.Module):
    """Residual add, a 1×1 side branch, ReLU6, depthwise conv, pooling and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU())
        self.pw = nn.Conv2d(8, 8, 1)
        self.side = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = self.pw(self.dw(h)) + self.side(h)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(h), 1), 1))


class _OldMean:
    """The previous per-channel mean: the whole output converted to float64, then summed."""

    def __init__(self) -> None:
        self.total, self.count = None, 0

    def add(self, y: torch.Tensor, layer: nn.Module) -> None:
        y = y.detach().double()
        if isinstance(layer, nn.Linear):
            flat = y.reshape(-1, y.shape[-1])
            s, n = flat.sum(0), flat.shape[0]
        else:
            flat = y.transpose(0, 1).reshape(y.shape[1], -1)
            s, n = flat.sum(1), flat.shape[1]
        self.total = s if self.total is None else self.total + s
        self.count += n

    @property
    def value(self) -> torch.Tensor | None:
        return None if self.total is None else self.total / max(self.count, 1)


def _reference_bias(qmodel: nn.Module, data, config) -> None:
    """The previous empirical bias correction: one float pass, then per layer one pass of the
    quantized network that stops right after that layer (``O(depth²)``)."""
    samples = config.bias_correction_options.samples
    layers = quant_layers(qmodel)
    order = [n for n in layer_order(qmodel, data, config) if layers[n].quantized]
    ref = {n: _OldMean() for n in order}
    hooks = [
        layers[n].register_forward_hook(lambda m, a, y, n=n: ref[n].add(y, m.layer)) for n in order
    ]
    with torch.no_grad(), float_mode(qmodel):
        for _i, args, kwargs in batches(data, config, qmodel, samples):
            qmodel(*args, **kwargs)
    for h in hooks:
        h.remove()
    for n in order:
        if ref[n].value is None:
            continue
        got, layer = _OldMean(), layers[n]
        h = layer.register_forward_hook(lambda m, a, y, got=got: got.add(y, m.layer))
        with torch.no_grad(), stop_after(layer):
            for i, args, kwargs in batches(data, config, qmodel, samples):
                run_until(qmodel, args, kwargs, i)
        h.remove()
        _add_to_bias(layer, ref[n].value - got.value)


def _reference_adaround(qmodel: nn.Module, data, config) -> None:
    """The previous AdaRound driver: per layer, the prefix runs twice per batch."""
    layers = quant_layers(qmodel)
    for k, name in enumerate(layer_order(qmodel, data, config)):
        layer = layers[name]
        lo, hi = weight_range(layer, config.weight_calibration)
        scale, zp = qparams(lo, hi, layer.spec)
        x, y = collect_prefix(qmodel, layer, data, config, config.seed + k)
        with torch.enable_grad():
            q, _ = ar.round_layer(
                layer, scale, zp, x, y, activation_after(qmodel, name), config.adaround_iters,
                config.seed + k, config.adaround_options,
            )
        layer.set_quantized(q, scale, zp)


@pytest.fixture(scope="module")
def branchy(digits_data) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Branchy().eval()
    with torch.no_grad():
        model.stem[1].running_mean.uniform_(-0.5, 0.5)
        model.stem[1].running_var.uniform_(0.5, 2.0)
    x = digits_data[0]
    return model, [x[i : i + 26] for i in range(0, 104, 26)]


@pytest.mark.parametrize("budget", [2 << 30, 1])  # 1 byte: every cached value spills to disk
def test_empirical_bias_equals_prefix_reruns(branchy, budget):
    model, data = branchy
    cfg = ptqkit.PTQConfig(
        weights=ptqkit.QuantSpec(bits=4, per_channel=False),
        progress=False,
        bias_correction_options=BiasCorrectionOptions(samples=60, memory_budget=budget),
    )
    plain = ptqkit.quantize(model, data, cfg)
    ours, ref = copy.deepcopy(plain), copy.deepcopy(plain)
    info = PTQInfo()
    correct_bias(ours, data, cfg.replace(bias_correction="empirical"), info)
    _reference_bias(ref, data, cfg)
    d = info.details["bias_correction"]
    assert d["engine"]["layers"] == 5 and d["passes"] == 2
    assert d["engine"]["batches"] == 3  # 60 samples: 26 + 26 + 8 of 26
    assert (d["engine"]["spilled"] > 0) == (budget == 1)
    for name, layer in quant_layers(ref).items():
        got = quant_layers(ours)[name].bias_q
        assert torch.allclose(got, layer.bias_q, atol=1e-5, rtol=0), name
        assert float((layer.bias_q - layer.bias_fp).abs().max()) > 1e-4  # really corrected
    x = data[0]
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_adaround_equals_prefix_reruns(branchy):
    model, data = branchy
    cfg = ptqkit.PTQConfig(
        weights=ptqkit.QuantSpec(bits=3, per_channel=True),
        calibration="minmax",
        bias_correction=False,
        progress=False,
        adaround_iters=30,
        adaround_options=ptqkit.config.AdaRoundOptions(max_rows=500, rows_per_batch=200),
    )
    ours = ptqkit.quantize(model, data, cfg.replace(adaround=True))
    assert ours.ptq_info.details["adaround"]["engine"]["cached_inputs"]
    plain = ptqkit.quantize(model, data, cfg)
    _reference_adaround(plain, data, cfg)
    for name, layer in quant_layers(plain).items():
        assert torch.equal(quant_layers(ours)[name].weight_int, layer.weight_int), name


def test_adaround_leaves_the_global_rng_alone(branchy):
    model, data = branchy
    cfg = ptqkit.PTQConfig(progress=False, adaround=True, adaround_iters=5, seed=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = ptqkit.quantize(model, data, cfg)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)  # another global state: same model (every draw is seeded by config.seed)
    b = ptqkit.quantize(model, data, cfg)
    for name, layer in quant_layers(a).items():
        assert torch.equal(quant_layers(b)[name].weight_int, layer.weight_int), name


class KwHead(nn.Module):
    """Keyword inputs (dict batches) and a default argument: placeholders bound by name."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, pixels: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
        return self.b(torch.relu(self.a(pixels.flatten(1) * scale)))


def test_keyword_batches_equal_prefix_reruns(digits_data):
    torch.manual_seed(0)
    model, x = KwHead().eval(), digits_data[0]
    data = [{"pixels": x[i : i + 40]} for i in range(0, 160, 40)]
    cfg = ptqkit.PTQConfig(
        weights=ptqkit.QuantSpec(bits=3),
        bias_correction_options=BiasCorrectionOptions(samples=160),  # all 4 keyword batches
        progress=False,
    )
    plain = ptqkit.quantize(model, data, cfg)
    ours, ref = copy.deepcopy(plain), copy.deepcopy(plain)
    info = PTQInfo()
    correct_bias(ours, data, cfg.replace(bias_correction="empirical"), info)
    _reference_bias(ref, data, cfg)
    assert info.details["bias_correction"]["engine"]["batches"] == 4
    for name, layer in quant_layers(ref).items():
        assert torch.allclose(quant_layers(ours)[name].bias_q, layer.bias_q, atol=1e-5), name


@pytest.mark.parametrize(
    "bad",
    [
        {"beta": (20.0,)},
        {"reg": -1.0},
        {"warmup": 1.0},
        {"max_rows": 0},
        {"lr": float("nan")},
        {"depthwise_rows_per_step": 0},
    ],
)
def test_adaround_options_are_validated(bad):
    with pytest.raises(ptqkit.ConfigError, match="AdaRoundOptions"):
        ptqkit.PTQConfig(adaround_options=bad)
    cfg = ptqkit.PTQConfig(adaround_options={"reg": 0.02, "beta": [10, 2]})
    assert ptqkit.PTQConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.adaround_options.beta == (10, 2)
