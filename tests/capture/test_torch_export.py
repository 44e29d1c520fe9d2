"""torch.export capture: between torch.fx and hooks, for models fx cannot trace."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptqkit
from ptqkit import PTQConfig, PTQWarning
from ptqkit.export import OrtModule, export_onnx, kernel_report, parity
from ptqkit.quant import sqnr_db

CFG = PTQConfig(calibration="minmax", bias_correction=False, progress=False)
PREPARE = importlib.import_module("ptqkit.capture.prepare")


def _bn(c: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g) * 0.2)
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn.eval()


class FlagNet(nn.Module):
    """``forward(x, embed=False)`` branching on a Python default: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = _bn(8, 1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = _bn(8, 2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x, embed=False):
        h = F.relu(self.bn1(self.c1(x)))
        h = F.relu6(self.bn2(self.c2(h)) + h)
        e = h.mean((2, 3))
        if embed:
            return e
        return self.fc(e)


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(n)]


def test_a_model_fx_cannot_trace_is_captured_by_torch_export(tmp_path, monkeypatch):
    torch.manual_seed(0)
    m = FlagNet().eval()
    data = _data()
    with pytest.warns(PTQWarning, match=r"captured with export \(fx: torch.fx cannot trace"):
        q = ptqkit.quantize(m, data, CFG)
    info = q.ptq_info
    assert info.capture == "export" and info.traced
    assert info.capture_attempts[0].startswith("fx: torch.fx cannot trace FlagNet (TraceError")
    assert info.folded_bn == ["bn1", "bn2"] and info.capture_error < 1e-4
    labels = set(info.quantizers.values())
    assert {"output of c1 after relu", "output of add after relu6"} <= labels, labels
    x = _data(n=1, seed=1)[0]
    with torch.no_grad():
        got = sqnr_db(m(x), q(x))
        assert q(x[:3]).shape == (3, 4)  # the batch dimension stays dynamic
    # the hook fallback on the same data: fewer quantized tensors, BatchNorm and add in float
    without = {k: v for k, v in PREPARE.CAPTURES.items() if k != "export"}
    monkeypatch.setattr(PREPARE, "CAPTURES", without)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qh = ptqkit.quantize(m, data, CFG)
    assert qh.ptq_info.capture == "hooks"
    with torch.no_grad():
        hooks = sqnr_db(m(x), qh(x))
    assert got >= 30 and got >= hooks, (got, hooks)  # measured: 52.1 vs 51.7 dB
    path = export_onnx(q, tmp_path / "flag.onnx", data[0][:1])
    rep = kernel_report(path)
    assert rep.ops.get("QLinearConv") == 2 and rep.float_nodes == [], rep.summary()
    res = parity(q, OrtModule(path, threads=1), data[:2])
    assert res.max_abs_diff <= 2 * res.step, res


class ScaleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x, scale=1.0, embed=False):
        e = F.relu(self.conv(x)).mean((2, 3)) * scale
        return e if embed else self.fc(e)


def test_batches_with_python_values_are_not_exported_with_their_first_value_baked_in():
    torch.manual_seed(0)
    m = ScaleNet().eval()
    data = [{"x": x, "scale": float(i + 1)} for i, x in enumerate(_data(n=4))]
    with pytest.warns(PTQWarning, match=r"export: the batches carry non-tensor inputs \(scale\)"):
        q = ptqkit.quantize(m, data, CFG)
    assert q.ptq_info.capture == "hooks"
    with torch.no_grad():
        assert sqnr_db(m(**data[2]), q(**data[2])) >= 30


def test_a_torch_export_capture_saves_and_loads(tmp_path):
    """``load`` re-runs torch.export on zeros laid out as the example batch (the file keeps its
    shapes and dtypes, no data) and gives the saved model back exactly."""
    torch.manual_seed(0)
    m, data = FlagNet().eval(), _data(n=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTQWarning)
        q = ptqkit.quantize(m, data, CFG)
    assert q.ptq_info.capture == "export"
    assert q.ptq_info.capture_inputs == {"args": [[[16, 3, 8, 8], "float32"]], "kwargs": {}}
    ptqkit.save(q, tmp_path / "flag.safetensors")
    loaded = ptqkit.load(tmp_path / "flag.safetensors", FlagNet().eval())
    assert loaded.ptq_info.capture == "export"
    with torch.no_grad():
        assert torch.equal(loaded(data[1]), q(data[1]))
        assert torch.equal(loaded(data[1][:5]), q(data[1][:5]))  # the batch is still dynamic
