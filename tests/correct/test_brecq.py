"""Block reconstruction (BRECQ, ptqkit.correct.brecq / .blocks): the graph is cut where a single
value is alive, a residual block stays whole, running the blocks one after the other is the
model, the learned roundings fit each block's float output better than nearest rounding and
bring the quantized model closer to FP32, and a model that cannot be cut falls back to
layer-wise AdaRound with a warning."""

from __future__ import annotations

import pytest
import torch
from test_engine_equivalence import Branchy
from torch import fx, nn

import ptqkit
from ptqkit.capture import prepare
from ptqkit.correct.blocks import run, split, why_not
from ptqkit.info import PTQInfo
from ptqkit.quant.modules import float_mode

W3 = ptqkit.QuantSpec(bits=3, per_channel=True)


def _graph(model: nn.Module) -> fx.GraphModule:
    gm = prepare(model.eval(), ptqkit.PTQConfig(progress=False), PTQInfo())
    assert isinstance(gm, fx.GraphModule)
    return gm


def test_a_residual_block_stays_whole_and_a_chain_is_grouped():
    gm = _graph(Branchy())
    blocks = split(gm, max_layers=1)
    assert blocks is not None
    # stem | dw, pw, side (residual: one block even above max_layers) | head
    assert [b.layers for b in blocks] == [["stem.0"], ["dw.0", "pw", "side"], ["head"]]
    convs = [nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)]
    chain = _graph(nn.Sequential(*convs, nn.Flatten(), nn.Linear(16, 3)))  # 8×8 inputs
    grouped = split(chain, max_layers=2)
    assert grouped is not None
    assert [len(b.layers) for b in grouped] == [2, 2]


def test_running_the_blocks_in_turn_is_the_model():
    torch.manual_seed(0)
    model = Branchy().eval()
    gm = _graph(model)
    blocks = split(gm, max_layers=3)
    assert blocks is not None
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad(), float_mode(gm):
        h = x
        for b in blocks:
            h = run(gm, b, h)
        assert torch.allclose(h, model(x), atol=1e-5)


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        return self.head(self.conv(self.conv(x)).mean((2, 3)))


class _TwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.a(x), self.b(x)


@pytest.mark.parametrize(
    "model,why", [(_Twice(), "called more than once"), (_TwoOut(), "more than one value")]
)
def test_graphs_that_cannot_be_cut_say_why(model, why):
    gm = _graph(model)
    assert why in str(why_not(gm))
    assert split(gm, 3) is None


def _sqnr(ref: nn.Module, q: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        a, b = ref(x), q(x)
    return float(10 * torch.log10(a.pow(2).sum() / (a - b).pow(2).sum()))


def test_w3_block_reconstruction_beats_nearest(digits_cnn, calib_batches, test_batches):
    base = ptqkit.PTQConfig(weights=W3, progress=False, bias_correction=False, adaround_iters=150)
    block = base.replace(adaround=True, adaround_options={"granularity": "block"})
    nearest = ptqkit.quantize(digits_cnn, calib_batches, base)
    learned = ptqkit.quantize(digits_cnn, calib_batches, block)
    d = learned.ptq_info.details["adaround"]
    assert d["granularity"] == "block"
    assert set(d["layers"]) == {"conv1", "conv2", "conv3", "fc"}
    for rec in d["blocks"]:
        assert rec["adaround"] < rec["nearest"], rec
    x = torch.cat([b for b, _ in test_batches])  # held out: not the calibration digits
    assert _sqnr(digits_cnn, learned, x) > _sqnr(digits_cnn, nearest, x) + 1.0
    for layer in ptqkit.quant.modules.quant_layers(learned).values():  # integers on the grid
        q = layer.weight_int.float()
        assert q.min() >= layer.spec.qmin and q.max() <= layer.spec.qmax
        assert torch.equal(q, q.round())
    assert not learned.ptq_info.warnings or all(
        "Block reconstruction" not in w for w in learned.ptq_info.warnings
    )


def test_a_model_that_cannot_be_cut_is_rounded_layer_by_layer_with_a_warning():
    torch.manual_seed(0)
    model = _Twice().eval()
    data = [torch.randn(8, 2, 4, 4) for _ in range(2)]
    cfg = ptqkit.PTQConfig(
        weights=W3,
        progress=False,
        adaround=True,
        adaround_iters=20,
        adaround_options={"granularity": "block"},
    )
    q = ptqkit.quantize(model, data, cfg)
    assert any("called more than once" in w for w in q.ptq_info.warnings)
    assert "granularity" not in q.ptq_info.details["adaround"]  # the layer-wise record
    assert set(q.ptq_info.details["adaround"]["layers"]) == {"conv", "head"}


def test_granularity_is_validated():
    with pytest.raises(ptqkit.ConfigError, match="granularity"):
        ptqkit.PTQConfig(adaround_options={"granularity": "net"})
