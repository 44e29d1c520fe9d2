"""The written-out gradients of AdaRound's optimizer (ptqkit.correct.rounding, .recon) equal
autograd's on the same loss, the Gram form of the reconstruction equals the row form, and the
early stop ends only a decided rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.config import AdaRoundOptions
from ptqkit.correct import adaround as ar
from ptqkit.correct.recon import GramObjective, RowObjective, arrange, objective, product
from ptqkit.correct.rounding import GAMMA, ZETA, SoftRounding, beta_at, settled
from ptqkit.errors import ConfigError
from ptqkit.quant.modules import QuantLayer
from ptqkit.quant.primitives import qparams

W4 = ptqkit.QuantSpec(bits=4, per_channel=True)


def _setup(conv: nn.Module, n: int = 64, seed: int = 0, spec: ptqkit.QuantSpec = W4):
    torch.manual_seed(seed)
    layer = QuantLayer(conv, spec)
    w = layer.weight_fp
    flat = w.reshape(w.shape[0], -1)
    scale, zp = qparams(flat.amin(1), flat.amax(1), layer.spec)
    g = getattr(conv, "groups", 1)
    k = flat.shape[1]
    x = torch.randn(n, g, k)
    y = product(w, arrange(x, g, w.shape[0]), g) + 0.05 * torch.randn(n, w.shape[0])
    if conv.bias is not None:
        y = y + conv.bias.detach()
    return layer, scale, zp, x, y.detach(), g


def _autograd_loss(r: SoftRounding, v: torch.Tensor, x, y, bias, bounds, g, reg, beta):
    h = torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)
    wq = (torch.clamp(r.base + h, r.spec.qmin, r.spec.qmax) - r.z) * r.s
    out = product(wq, arrange(x, g, wq.shape[0]), g) + (bias if bias is not None else 0)
    goal = y
    if bounds is not None:
        out, goal = out.clamp(*bounds), y.clamp(*bounds)  # floats, or a (lo, hi) per channel
    rec = (out - goal).pow(2).sum(1).mean()
    return rec + reg * (1 - (2 * h - 1).abs().pow(beta)).sum()


@pytest.mark.parametrize(
    "conv,bounds",
    [
        (lambda: nn.Linear(12, 5), (0.0, 6.0)),
        (lambda: nn.Conv2d(4, 6, 3), None),
        (lambda: nn.Conv2d(6, 6, 3, groups=6, bias=False), (0.0, float("inf"))),
        (lambda: nn.Conv2d(4, 8, 1, groups=2), (0.0, 6.0)),
        (
            lambda: nn.Conv2d(4, 6, 3),
            ([-1.0, 0.0, 0.0, -0.5, 0.0, 0.1], [6.0, 1.0, 2.0, 6.0, 3.0, 9.0]),
        ),
    ],
    ids=["linear", "conv", "depthwise", "grouped", "per-channel-clamp"],
)
@pytest.mark.parametrize("beta", [4.0, 2.0, 1.5])
@pytest.mark.parametrize("symmetric", [True, False])
def test_written_out_gradient_equals_autograd(conv, bounds, beta, symmetric):
    spec = ptqkit.QuantSpec(bits=4, per_channel=True, symmetric=symmetric)
    layer, scale, zp, x, y, g = _setup(conv(), spec=spec)
    assert bool((zp != 0).any()) != symmetric  # the asymmetric grid has its zero-points
    r = SoftRounding(layer, scale, zp)
    r.v = r.v + 0.3 * torch.randn_like(r.v)  # some h inside (0, 1), some clipped
    bias = layer.bias.detach().float() if layer.bias is not None else None
    tb = None if bounds is None else tuple(torch.tensor(b) for b in bounds)
    assert tb is None or tb[0].numel() in (1, y.shape[1])
    rows = RowObjective(x, y, bias, tb, g, rows_per_step=x.shape[0], seed=0)
    got = r.grad(rows.grad(r.soft()), reg=0.01, beta=beta)
    v = r.v.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(_autograd_loss(r, v, x, y, bias, tb, g, 0.01, beta), v)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    if bounds is None:
        gram = GramObjective(x, y, bias, g)
        torch.testing.assert_close(gram.grad(r.soft()), rows.grad(r.soft()), rtol=1e-3, atol=1e-5)
        w = r.soft()
        assert gram.loss(w) == pytest.approx(rows.loss(w), rel=1e-3)


def test_objective_picks_gram_only_without_activation():
    _, _, _, x, y, g = _setup(nn.Conv2d(4, 6, 3))
    assert isinstance(objective(x, y, None, None, g, 64, 0), GramObjective)
    bounds = (torch.tensor(0.0), torch.tensor(6.0))
    assert isinstance(objective(x, y, None, bounds, g, 64, 0), RowObjective)
    assert isinstance(objective(x, y, None, None, g, 8, 0), RowObjective)  # k = 36 ≥ 2·8


def test_early_stop_only_when_every_h_is_decided():
    layer, scale, zp, *_ = _setup(nn.Linear(12, 5))
    r = SoftRounding(layer, scale, zp)
    opts = AdaRoundOptions()
    assert beta_at(10, 100, opts) is None and beta_at(20, 100, opts) == 20.0
    r.v = torch.where(r.v >= 0, 3.0, -3.0)  # every h exactly 0 or 1
    assert not settled(10, 100, opts, [r])  # warm-up: the regularizer is not on yet
    assert settled(20, 100, opts, [r])
    assert not settled(20, 100, AdaRoundOptions(early_stop=False), [r])
    r.v[0, 0] = 0.5
    assert not settled(20, 100, opts, [r])
    with pytest.raises(ConfigError, match="early_stop"):
        AdaRoundOptions(early_stop=1)  # type: ignore[arg-type]


def test_early_stop_gives_the_same_rounding_as_all_steps():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    layer = QuantLayer(lin, W4)
    w = layer.weight_fp
    scale, zp = qparams(w.amin(1), w.amax(1), layer.spec)
    x = torch.randn(512, 4) @ torch.randn(4, 16) + 0.1 * torch.randn(512, 16)
    y = (x @ w.T + lin.bias).detach()
    fast, lf = ar.round_layer(layer, scale, zp, x.unsqueeze(1), y, None, 2000, 0)
    full, ll = ar.round_layer(
        layer, scale, zp, x.unsqueeze(1), y, None, 2000, 0, AdaRoundOptions(early_stop=False)
    )
    assert lf["steps"] < 2000 and ll["steps"] == 2000, (lf, ll)
    assert torch.equal(fast, full)
    assert lf["adaround"] < lf["nearest"]


@pytest.mark.parametrize("fan_in,out,rows,threads", [(16, 8, 256, 1), (128, 64, 1024, 2)])
def test_thread_count_follows_the_step_size_and_is_restored(fan_in, out, rows, threads):
    torch.manual_seed(0)
    lin = nn.Linear(fan_in, out)
    layer = QuantLayer(lin, W4)
    w = layer.weight_fp
    scale, zp = qparams(w.amin(1), w.amax(1), layer.spec)
    x = torch.randn(rows, fan_in)
    y = torch.relu(x @ w.T + lin.bias).detach()
    bounds = (torch.tensor(0.0), torch.tensor(float("inf")))
    small = 2 * rows * fan_in * out < ar.SMALL_STEP  # multiply-adds of one step
    assert small == (threads == 1)
    seen = []
    before = torch.get_num_threads()
    real = ar.adam_step

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    try:
        torch.set_num_threads(2)
        ar.adam_step = spy
        _, losses = ar.round_layer(layer, scale, zp, x.unsqueeze(1), y, bounds, 20, 0)
        assert torch.get_num_threads() == 2
    finally:
        ar.adam_step = real
        torch.set_num_threads(before)
    assert seen and set(seen) == {threads}
    assert losses["adaround"] <= losses["nearest"]


@pytest.mark.parametrize(
    "conv,depthwise",
    [(nn.Conv2d(6, 6, 3, groups=6), True), (nn.Conv2d(4, 8, 1, groups=2), False)],
)
def test_depthwise_layers_step_on_their_own_row_count(conv, depthwise):
    layer, scale, zp, x, y, _ = _setup(conv, n=600)
    seen = []
    real = ar.objective

    def spy(*a):
        seen.append(a[5])  # rows per step
        return real(*a)

    opts = AdaRoundOptions(rows_per_step=500, depthwise_rows_per_step=100)
    ar.objective = spy
    try:
        bounds = (torch.tensor(0.0), torch.tensor(6.0))
        ar.round_layer(layer, scale, zp, x, y, bounds, 5, 0, opts)
    finally:
        ar.objective = real
    assert seen == [100 if depthwise else 500]


@pytest.mark.parametrize("strided", [False, True])
def test_fused_adam_step_equals_the_written_out_one(monkeypatch, strided):
    from ptqkit.correct import rounding

    if rounding.FUSED_ADAM is None:
        pytest.skip("this PyTorch has no fused Adam kernel")
    layer, scale, zp, *_ = _setup(nn.Conv2d(4, 6, 3))
    fused, plain = SoftRounding(layer, scale, zp), SoftRounding(layer, scale, zp)
    gen = torch.Generator().manual_seed(0)
    for t in range(200):
        grad = torch.randn(fused.v.shape, generator=gen) * (t % 7 + 0.1)
        if strided:  # the same values laid out otherwise (a depthwise layer's gradient was)
            grad = grad.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
            assert not grad.is_contiguous()
        rounding.adam_step(fused, grad, 0.01)
        with monkeypatch.context() as m:
            m.setattr(rounding, "FUSED_ADAM", None)
            rounding.adam_step(plain, grad, 0.01)
    assert fused.t == plain.t == 200
    assert torch.allclose(fused.v, plain.v, atol=1e-5)
    assert torch.allclose(fused.m2, plain.m2, rtol=1e-5)
    assert not torch.equal(fused.v, SoftRounding(layer, scale, zp).v)  # it moved


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(16, 16, 3, groups=16),
        lambda: nn.Conv2d(16, 16, 1, groups=2),
        lambda: nn.Linear(32, 16),
    ],
    ids=["depthwise", "grouped", "linear"],
)
def test_mini_batch_rounding_beats_nearest(conv):
    """The whole loop (soft rounding, mini-batch gradient, Adam) on every product layout lowers
    the reconstruction loss below nearest rounding's on all the rows (a depthwise gradient laid
    out otherwise than ``V`` once made it worse than nearest)."""
    layer, scale, zp, x, _, g = _setup(conv(), n=2048)
    x = x[..., :1] + 0.3 * x  # correlated inputs (as real activations): errors can cancel
    w = layer.weight_fp.detach()
    y = product(w, arrange(x, g, w.shape[0]), g, layer.bias.detach())  # the float output
    opts = AdaRoundOptions(rows_per_step=128, depthwise_rows_per_step=128)
    bounds = (torch.tensor(0.0), torch.tensor(6.0))
    _, losses = ar.round_layer(layer, scale, zp, x, y, bounds, 300, 0, opts)
    assert losses["adaround"] < 0.8 * losses["nearest"]
