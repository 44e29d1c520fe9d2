"""Dynamic activation quantization (``QuantSpec(dynamic=True)``): the quantizer equals a
hand-written per-row reference bit for bit, it has no calibration state, it can be mixed with
static activations by scope, and a small transformer block quantized with it stays close to
float (bounds with a wide margin, on a seeded untrained block: the same on any CPU)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptqkit
from ptqkit import ConfigError, PTQConfig, QuantSpec, Scope
from ptqkit.calibrate.session import observe_all
from ptqkit.info import PTQInfo
from ptqkit.quant.dynamic import dynamic_fake_quant
from ptqkit.quant.modules import ActQuant, act_quants, quant_layers
from ptqkit.quant.primitives import sqnr_db

PER_ROW = QuantSpec(bits=8, symmetric=False, per_channel=True, dynamic=True)
SPECS = [
    PER_ROW,
    QuantSpec(bits=8, symmetric=True, per_channel=True, dynamic=True),
    QuantSpec(bits=4, symmetric=False, per_channel=True, dynamic=True),
    QuantSpec(bits=8, symmetric=False, dynamic=True),  # per tensor
    QuantSpec(bits=3, symmetric=True, dynamic=True),
]


def reference(x: np.ndarray, bits: int, symmetric: bool, per_row: bool) -> np.ndarray:
    """Row by row in numpy float32, written from the formulas (round half to even = rint)."""
    f = np.float32
    x2 = x.reshape(-1, x.shape[-1]) if per_row else x.reshape(1, -1)
    out = np.empty_like(x2)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    for r, row in enumerate(x2):
        lo, hi = min(f(0), row.min()), max(f(0), row.max())
        if symmetric:
            s, z = max(f(max(-lo, hi) / f(qmax)), f(1e-10)), f(0)
        else:
            s = max(f((hi - lo) / f(qmax - qmin)), f(1e-10))
            z = f(np.clip(np.rint(f(qmin) - lo / s), qmin, qmax))
        q = np.clip(np.rint(row / s) + z, qmin, qmax)
        out[r] = ((q - z) * s).astype(f)
    return out.reshape(x.shape)


@pytest.mark.parametrize(
    "spec",
    SPECS,
    ids=lambda s: f"b{s.bits}{'s' if s.symmetric else 'a'}{'row' if s.per_channel else 'tensor'}",
)
def test_equals_the_per_row_reference(spec):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 24, generator=g) * torch.logspace(-2, 2, 7).reshape(1, 7, 1)
    x[0, 0] = 0.0  # an all-zero row: scale MIN_SCALE, every value back to 0
    x[1, 2] = x[1, 2].abs()  # a row without negatives
    q = ActQuant(spec)
    q.mode = "quant"
    out = q(x)
    ref = reference(x.numpy(), spec.bits, spec.symmetric, spec.per_channel)
    assert torch.equal(out, torch.from_numpy(ref))
    assert torch.equal(out[0, 0], torch.zeros(24)) or not spec.per_channel
    # per row: each row's scale is its own, so rescaling one row rescales only its output
    if spec.per_channel:
        y = x.clone()
        y[2] *= 2.0**5  # a power of two: the grid scales exactly
        assert torch.equal(q(y)[:2], out[:2])


def test_nonfinite_values_do_not_widen_the_row():
    x = torch.tensor([[1.0, -0.5, float("nan"), 0.25], [1.0, -0.5, float("inf"), 0.25]])
    out = dynamic_fake_quant(x, PER_ROW)
    finite = dynamic_fake_quant(torch.tensor([[1.0, -0.5, 0.0, 0.25]]), PER_ROW)
    assert torch.isnan(out[0, 2]) and out[1, 2] == finite[0].max()  # Inf saturates
    assert torch.equal(out[:, [0, 1, 3]], finite[:, [0, 1, 3]].expand(2, 3))


class Block(nn.Module):
    """A pre-LN transformer block: attention (q/k/v/o Linears, two activation matmuls) and an
    MLP, with residual adds."""

    def __init__(self, d: int = 32, h: int = 64) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        att = torch.softmax(self.q(y) @ self.k(y).transpose(-1, -2) / 32**0.5, -1)
        x = x + self.o(att @ self.v(y))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


LINEARS = ["q", "k", "v", "o", "fc1", "fc2"]


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    return Block().eval()


def tokens(n: int, seed: int, outliers: bool = False) -> torch.Tensor:
    """Batches of 6 tokens; ``outliers``: one token in each sequence 300x larger (the way
    transformer activations carry a few huge tokens)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 32, generator=g)
    if outliers:
        x[:, 0] *= 300.0
    return x


def _cfg(**kw):
    return PTQConfig(progress=False, bias_correction=False, **kw)


def _sqnr(model, qmodel, x, rows=slice(None)):
    """Output SQNR (dB) on the tokens ``rows`` (the outlier token's own output would dominate
    the signal: the others are what a per-tensor grid loses)."""
    with torch.no_grad():
        return sqnr_db(model(x)[:, rows], qmodel(x)[:, rows])


def test_no_calibration_state(block):
    data = [tokens(8, i, outliers=True) for i in range(4)]
    cfg = _cfg(scopes=[("Linear", {"activations": PER_ROW})])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = ptqkit.quantize(block, data, cfg)
    dyn = {n: a for n, a in act_quants(q).items() if a.spec.dynamic}
    assert sorted(dyn) == sorted(f"{n}.input_quant" for n in LINEARS)
    for name, a in dyn.items():
        assert a.mode == "quant" and not a.calibrated and a.calibrator is None
        assert a.scale.item() == 1.0 and not a.range.any()  # never written
        assert name not in q.ptq_info.disabled
    said = " ".join(str(w.message) for w in caught) + " ".join(q.ptq_info.warnings)
    assert "(dynamic)" not in said  # no outlier / range warning names a dynamic quantizer
    # the static ones were calibrated as usual, in the same pass
    static = [a for a in act_quants(q).values() if not a.spec.dynamic]
    assert static and all(a.calibrated for a in static)
    assert q.ptq_info.layer_settings["fc1"]["activations"] == PER_ROW.to_dict()
    # the calibration session gives the dynamic ones no calibrator
    q2 = ptqkit.quantize(block, data, cfg)
    cals, _ = observe_all(q2, data, cfg, PTQInfo())
    assert cals and not set(cals) & set(dyn)


def test_all_dynamic_runs_no_calibration_pass(block):
    q = ptqkit.quantize(block, [tokens(8, 0)], _cfg(activations=PER_ROW))
    assert q.ptq_info.calibration_batches == 0
    assert {n for n, a in act_quants(q).items()} == {f"{n}.input_quant" for n in LINEARS}


def test_block_close_to_float(block):
    """W8 per-channel + dynamic A8 on the Linears of a transformer block: the error of 8-bit
    rounding. All-dynamic (the attention matmuls and adds float) measured 53 dB, also on the
    tokens beside 300x outlier tokens; mixed (dynamic Linears, static per-tensor grids on the
    attention matmuls and residual adds) 37.5 dB. Bounds 30 / 25 dB."""
    row = ptqkit.quantize(
        block, [tokens(8, i, outliers=True) for i in range(4)], _cfg(activations=PER_ROW)
    )
    x, plain = tokens(16, 99, outliers=True), tokens(16, 98)
    assert _sqnr(block, row, x, slice(1, None)) > 30.0 and _sqnr(block, row, plain) > 30.0
    mixed = ptqkit.quantize(
        block,
        [tokens(8, i) for i in range(4)],
        _cfg(scopes=[(nn.Linear, {"activations": PER_ROW})]),
    )
    assert _sqnr(block, mixed, plain) > 25.0
    assert all(quant_layers(mixed)[n].input_quant.spec.dynamic for n in LINEARS)
    assert any(not a.spec.dynamic and a.calibrated for a in act_quants(mixed).values())


def test_per_row_keeps_small_tokens():
    """Tokens whose scales span 10^-2..10^2 (no LayerNorm in between): one grid for the tensor
    (8-bit, static or dynamic) has a step of ~100/127, so the 0.01-scale tokens round to zero
    (~0 dB); a grid per row keeps every token at ~40 dB. Bounds: > 30 dB vs < 10 dB."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    g = torch.Generator().manual_seed(1)
    scales = torch.logspace(-2, 2, 8).reshape(1, 8, 1)
    x = torch.randn(4, 8, 32, generator=g) * scales
    row = ptqkit.quantize(mlp, [x], _cfg(activations=PER_ROW))
    tensor = ptqkit.quantize(
        mlp, [x], _cfg(activations=QuantSpec(bits=8, symmetric=False, dynamic=True))
    )
    small = slice(0, 1)  # the 0.01-scale token of each sequence
    assert _sqnr(mlp, row, x, small) > 30.0 and _sqnr(mlp, row, x) > 30.0
    assert _sqnr(mlp, tensor, x, small) < 10.0


def test_float_layer_means_float_input(block):
    """A layer kept in float (fallback, sensitivity: ``use_float``) takes its input in float:
    the dynamic quantizer is part of its integer matmul."""
    x = tokens(4, 5)
    q = ptqkit.quantize(block, [tokens(8, 0)], _cfg(activations=PER_ROW))
    for layer in quant_layers(q).values():
        layer.use_float()
    with torch.no_grad():
        assert torch.allclose(q(x), block(x), atol=1e-6)


def test_bias_correction_and_fallback_run(block):
    data = [tokens(8, i) for i in range(4)]
    for bc in ("empirical", "affine"):
        q = ptqkit.quantize(
            block, data, PTQConfig(progress=False, bias_correction=bc, activations=PER_ROW)
        )
        assert _sqnr(block, q, tokens(16, 7)) > 30.0
    # a target no quantized layer can meet: the fallback keeps layers float until it holds
    q = ptqkit.quantize(
        block,
        data,
        PTQConfig(progress=False, bias_correction=False, activations=PER_ROW, min_sqnr_db=60.0),
    )
    kept = q.ptq_info.details["fallback"]["kept_float"]
    assert kept and all(k["quantizers"] == [f"{k['layer']}.input_quant"] for k in kept)
    for k in kept:
        assert q.ptq_info.disabled[f"{k['layer']}.input_quant"].startswith("fallback")
    assert _sqnr(block, q, data[0]) > 60.0


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_dynamic_on_a_conv_is_refused():
    net, data = ConvNet().eval(), [torch.randn(2, 3, 8, 8)]
    with pytest.raises(ConfigError, match=r"conv .*Conv2d.*for Linear layers"):
        ptqkit.quantize(net, data, _cfg(activations=PER_ROW))
    with pytest.raises(ConfigError, match=r"conv .*Conv2d"):
        ptqkit.quantize(net, data, _cfg(scopes=[("conv", {"activations": PER_ROW})]))
    q = ptqkit.quantize(net, data, _cfg(scopes=[("fc", {"activations": PER_ROW})]))
    assert quant_layers(q)["fc"].input_quant.spec.dynamic  # the Linear of a CNN: fine


def test_spec_validation_and_round_trip():
    with pytest.raises(ConfigError, match="per row"):
        QuantSpec(dynamic=True, per_channel=True, axis=1)
    with pytest.raises(ConfigError, match="dynamic"):
        QuantSpec(dynamic="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="weights cannot be dynamic"):
        PTQConfig(weights=QuantSpec(dynamic=True))
    with pytest.raises(ConfigError, match="static QuantSpec"):
        Scope("fc", weights=QuantSpec(dynamic=True))
    with pytest.raises(ConfigError, match=r"QuantSpec\(dynamic=True\)"):
        Scope("fc", activations=QuantSpec(bits=8))  # a static spec per scope: model-wide only
    assert "dynamic" not in QuantSpec().to_dict()  # old dicts / files unchanged
    cfg = _cfg(activations=PER_ROW, scopes=[("fc*", {"activations": PER_ROW.to_dict()})])
    assert PTQConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("per_channel", [True, False])
def test_dynamic_model_saves_and_reloads_bit_identically(tmp_path, per_channel):
    torch.manual_seed(0)

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()

    data = [torch.randn(8, 16) for _ in range(4)]
    spec = QuantSpec(bits=8, symmetric=False, per_channel=per_channel, dynamic=True)
    q = ptqkit.quantize(net(), data, PTQConfig(activations=spec, progress=False))
    path = tmp_path / "dyn.ptq.safetensors"
    ptqkit.save(q, path)
    back = ptqkit.load(path, net())
    with torch.no_grad():
        assert torch.equal(back(data[0]), q(data[0]))
        assert sqnr_db(net()(data[0]), back(data[0])) > 30
