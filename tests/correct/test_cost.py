"""ptqkit.correct.cost: AdaRound's expected time from the layers' shapes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.correct.cost import T_OP, E, LayerWork, Machine, adaround_seconds, layer_work, probe

#: fixed rates, so that the arithmetic can be checked by hand
M = Machine(mm_rate=1e10, elem_s=1e-9)


class Net(nn.Module):
    """conv → ReLU, depthwise conv → ReLU, 1×1 conv into a residual add (no activation), linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        y = y + self.pw(torch.relu(self.dw(y)))
        return self.fc(y.mean((2, 3)))


def _quantized(model: nn.Module) -> nn.Module:
    data = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ptqkit.quantize(model, data, ptqkit.PTQConfig(progress=False))


def test_layer_work_reads_shapes_groups_and_what_follows():
    work = layer_work(_quantized(Net().eval()))
    assert work == [
        LayerWork(weights=216, out=8, k=27, depthwise=False, gram=False),  # ReLU after it
        LayerWork(weights=72, out=8, k=9, depthwise=True, gram=False),
        LayerWork(weights=64, out=8, k=8, depthwise=False, gram=True),  # into the add
        LayerWork(weights=32, out=4, k=8, depthwise=False, gram=True),  # the output
    ]


def test_transposed_conv_counts_its_outputs():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 6, 2, groups=2)).eval()
    work = layer_work(_quantized(m))
    assert work[1].weights == 4 * 3 * 2 * 2 and work[1].out == 6 and work[1].k == 8


def test_the_estimate_is_the_documented_formula():
    big = LayerWork(weights=3072 * 1024, out=1024, k=3072, depthwise=False, gram=False)
    dw = LayerWork(weights=96 * 9, out=96, k=9, depthwise=True, gram=False)
    gram = LayerWork(weights=64 * 192, out=64, k=192, depthwise=False, gram=True)
    cfg = ptqkit.PTQConfig(adaround=True, adaround_iters=100)
    opts = cfg.adaround_options

    def step(w: int, macs: float) -> float:
        return T_OP + macs / M.mm_rate + E * w * M.elem_s

    expect = 100 * (
        step(big.weights, 2 * opts.rows_per_step * big.weights)
        + step(dw.weights, 2 * opts.depthwise_rows_per_step * dw.weights)
        + step(gram.weights, 64 * 193**2)  # O·(k+1)²: cheaper than 2·B·|W| here
    ) + sum(2 * opts.max_rows * lw.weights / M.mm_rate for lw in (big, dw, gram))
    assert adaround_seconds([big, dw, gram], cfg, M) == pytest.approx(expect)
    # the cost grows with the weights and the steps, not with the number of layers
    assert adaround_seconds([big], cfg, M) > 10 * adaround_seconds([dw, gram] * 10, cfg, M)
    twice = cfg.replace(adaround_iters=200)
    assert adaround_seconds([big], twice, M) == pytest.approx(
        2 * adaround_seconds([big], cfg, M) - 2 * opts.max_rows * big.weights / M.mm_rate
    )


def test_probe_measures_positive_finite_rates():
    m = probe()
    assert 1e6 < m.mm_rate < 1e16 and 1e-13 < m.elem_s < 1e-5


def test_adaround_says_what_it_expects_to_cost(caplog):
    data = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    cfg = ptqkit.PTQConfig(adaround=True, adaround_iters=5, progress=False)
    with caplog.at_level("INFO", logger="ptqkit"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ptqkit.quantize(Net().eval(), data, cfg)
    said = [r.getMessage() for r in caplog.records if r.name == "ptqkit.adaround"]
    assert len(said) == 1 and "4 layers" in said[0] and "5 steps each" in said[0], said
    assert "of optimization expected" in said[0] and "weights" in said[0]
