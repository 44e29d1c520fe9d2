"""GPTQ (ptqkit.correct.gptq): the blocked solver against a column-by-column reference written
here, better than nearest rounding on held-out inputs where it must be (correlated inputs),
dead inputs, unreached layers, untraced models, convs (grouped too) and bad configs."""

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.calibrate.weights import mse_groups
from ptqkit.config import GPTQOptions, PTQConfig, QuantSpec
from ptqkit.correct.gptq_solve import solve
from ptqkit.errors import ConfigError
from ptqkit.quant.modules import quant_layers
from ptqkit.quant.primitives import qparams


def _reference(w, h, spec, damp, act_order, fixed=None, method="minmax"):
    """GPTQ column by column (no blocks, no lazy updates), float64, one weight matrix."""
    w, h = w.clone().double(), h.clone().double()
    k = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    h = h + damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    orig = perm if perm is not None else torch.arange(k)
    flat = dataclasses.replace(spec, group_size=None)
    gs = spec.group_size
    scales: dict[int, tuple] = {}
    q = torch.zeros_like(w)
    for j in range(k):
        if gs is None:
            s, z = fixed
        else:
            grp = int(orig[j]) // gs
            if grp not in scales:
                cols = [p for p in range(k) if int(orig[p]) // gs == grp]
                cur = w[:, cols]
                lo, hi = (
                    mse_groups(cur, spec) if method == "mse" else (cur.min(1)[0], cur.max(1)[0])
                )
                scales[grp] = qparams(lo, hi, flat)
            s, z = scales[grp]
        s, z = s.double(), z.double()
        q[:, j] = torch.clamp(torch.round(w[:, j] / s) + z, spec.qmin, spec.qmax)
        e = (w[:, j] - (q[:, j] - z) * s) / u[j, j]
        w[:, j:] -= e[:, None] * u[j, j:][None, :]
    if perm is not None:
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(k)
        q = q[:, inv]
    return q, scales


def _correlated(n: int, k: int, rank: int, seed: int, draw: int = 0) -> torch.Tensor:
    """Rank-``rank`` inputs plus 5% noise; ``seed`` fixes the mixing, ``draw`` the samples."""
    mix = torch.randn(rank, k, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed * 1000 + draw)
    return torch.randn(n, rank, generator=g) @ mix + 0.05 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("group", "method"), [(None, "minmax"), (64, "minmax"), (48, "mse")])
def test_blocked_equals_column_by_column(act_order: bool, group, method: str) -> None:
    """block_size 128 and 32 (lazy updates, groups spanning blocks, a last short group of 300
    columns) give the reference's integers and scales; float64, so no rounding tie flips."""
    torch.manual_seed(0)
    k, o = 300, 24
    x = _correlated(400, k, 20, 1).double()
    x[:, 7] = 0  # a dead input
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(o, k, dtype=torch.float64) * 0.1
    spec = QuantSpec(bits=3, symmetric=group is None, per_channel=True, group_size=group)
    fixed = None
    if group is None:
        fixed = qparams(w.min(1)[0].float(), w.max(1)[0].float(), spec)
    want, scales = _reference(w, h, spec, 0.01, act_order, fixed, method)
    for bs in (128, 32):
        opts = GPTQOptions(block_size=bs, act_order=act_order)
        fx = None if fixed is None else (fixed[0][None], fixed[1][None])
        got = solve(w[None], h[None], spec, opts, fx, method)
        assert got.dead == 1 and got.damp == 0.01
        assert torch.equal(got.q[0], want)
        if group is not None:
            ref_s = torch.stack([scales[j][0] for j in range(len(scales))], dim=1)
            assert torch.equal(got.scale[0], ref_s)


class _Two(nn.Module):
    def __init__(self, k: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(k, 48)
        self.fc2 = nn.Linear(48, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _cfg(**kw) -> PTQConfig:
    base = dict(activations=None, progress=False, bias_correction=False)
    return PTQConfig(**{**base, **kw})


def _held_out_error(model, q, x) -> float:
    with torch.no_grad():
        return float((q(x) - model(x)).pow(2).mean())


@pytest.mark.parametrize(
    "weights",
    [QuantSpec(bits=3, per_channel=True), QuantSpec(bits=3, per_channel=True, group_size=16)],
)
def test_beats_nearest_on_held_out_correlated_inputs(weights: QuantSpec) -> None:
    """Inputs of rank 6 (plus 5% noise): the error GPTQ moves into the directions the data never
    takes costs nothing on held-out inputs from the same distribution; nearest rounding's does.
    Measured: GPTQ's held-out error is ~1/7-1/9 of nearest's (0.0027 vs 0.023); the bound is 1/2."""
    torch.manual_seed(0)
    model = _Two().eval()
    calib = list(_correlated(512, 64, 6, 2).split(64))
    held = _correlated(512, 64, 6, 2, draw=1)  # held out: other samples of the same law
    rtn = ptqkit.quantize(model, calib, _cfg(weights=weights))
    gq = ptqkit.quantize(model, calib, _cfg(weights=weights, gptq=GPTQOptions(samples=512)))
    e_rtn, e_gptq = _held_out_error(model, rtn, held), _held_out_error(model, gq, held)
    assert e_gptq < 0.5 * e_rtn, (e_gptq, e_rtn)
    rec = gq.ptq_info.details["gptq"]["layers"]
    assert set(rec) == {"fc1", "fc2"}
    for r in rec.values():
        assert r["rows"] == 512 and r["gptq"] < r["rtn"]
    assert "gptq" in gq.ptq_info.stages and "weights" not in gq.ptq_info.stages


def test_dead_input_is_rounded_to_nearest() -> None:
    torch.manual_seed(0)
    model = _Two().eval()
    calib = [x.index_fill(1, torch.tensor([5]), 0.0) for x in _correlated(256, 64, 6, 3).split(64)]
    spec = QuantSpec(bits=4, per_channel=True)
    rtn = quant_layers(ptqkit.quantize(model, calib, _cfg(weights=spec)))["fc1"]
    gq_model = ptqkit.quantize(model, calib, _cfg(weights=spec, gptq=True))
    gq = quant_layers(gq_model)["fc1"]
    assert gq_model.ptq_info.details["gptq"]["layers"]["fc1"]["dead_inputs"] == 1
    assert torch.equal(gq.weight_int[:, 5], rtn.weight_int[:, 5])
    assert torch.equal(gq.weight_scale, rtn.weight_scale)
    assert not torch.equal(gq.weight_int, rtn.weight_int)


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(torch.relu(self.dw(torch.relu(self.c1(x)))))


def _smooth_images(n: int, seed: int) -> torch.Tensor:
    """Blurred noise: neighbouring pixels strongly correlated."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    k = torch.ones(3, 1, 5, 5) / 25
    return torch.nn.functional.conv2d(x, k, padding=2, groups=3) * 3


@pytest.mark.parametrize("group", [None, 9])
def test_convs_grouped_and_depthwise(group) -> None:
    torch.manual_seed(0)
    model = _Convs().eval()
    calib = list(_smooth_images(32, 1).split(8))
    held = _smooth_images(32, 2)
    spec = QuantSpec(bits=3, per_channel=True, group_size=group)
    rtn = ptqkit.quantize(model, calib, _cfg(weights=spec))
    gq = ptqkit.quantize(model, calib, _cfg(weights=spec, gptq=True))
    rec = gq.ptq_info.details["gptq"]["layers"]
    assert rec["c1"]["rows"] == 32 * 16 * 16 and rec["dw"]["rows"] == 32 * 16 * 16
    for r in rec.values():
        assert r["gptq"] <= r["rtn"] * 1.0001
    assert _held_out_error(model, gq, held) < 0.5 * _held_out_error(model, rtn, held)
    if group:
        assert tuple(quant_layers(gq)["c1"].weight_scale.shape) == (16, 3)  # 27 = 9+9+9


class _Branchy(nn.Module):
    """Data-dependent control flow (not traceable: prefix path); ``never`` never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 8)
        self.never = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if bool(h.sum() < -1e9):
            return self.never(h)
        return self.fc2(h)


def test_untraced_model_and_unreached_layer() -> None:
    torch.manual_seed(0)
    model = _Branchy().eval()
    calib = list(_correlated(256, 32, 4, 4).split(64))
    spec = QuantSpec(bits=3, per_channel=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gq = ptqkit.quantize(model, calib, _cfg(weights=spec, gptq=True))
    det = gq.ptq_info.details["gptq"]
    assert det["engine"]["cached_inputs"] is False
    assert (
        det["layers"]["fc1"]["rows"] == 128  # GPTQOptions.samples
        and det["layers"]["fc2"]["gptq"] < det["layers"]["fc2"]["rtn"]
    )
    assert "no calibration data" in det["layers"]["never"]["skipped"]
    assert any("never" in w and "GPTQ" in w for w in gq.ptq_info.warnings)
    assert quant_layers(gq)["never"].quantized


def test_config() -> None:
    assert PTQConfig(gptq=True).gptq == GPTQOptions()
    assert PTQConfig(gptq=False).gptq is None
    c = PTQConfig(gptq={"act_order": True, "block_size": 64})
    assert c.gptq == GPTQOptions(act_order=True, block_size=64)
    assert PTQConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="adaround"):
        PTQConfig(gptq=GPTQOptions(), adaround=True)
    with pytest.raises(ConfigError, match="GPTQOptions"):
        PTQConfig(gptq="yes")
    with pytest.raises(ConfigError, match="unknown GPTQOptions"):
        PTQConfig(gptq={"blocksize": 64})
    for bad in ({"damp": 0}, {"damp": -1.0}, {"block_size": 0}, {"act_order": 1}):
        with pytest.raises(ConfigError, match="GPTQOptions"):
            GPTQOptions(**bad)
