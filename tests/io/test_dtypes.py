"""A model saved in half / bfloat16 / double (``.to(dtype)`` after quantize, or quantized in
that dtype) loads as it was saved, onto a float32 architecture or one of its own dtype, and
computes what it computed, bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit import PTQConfig, PTQWarning
from ptqkit.quant.modules import act_quants, float_mode, quant_layers
from ptqkit.quant.primitives import sqnr_db


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


DATA = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]


def _quantize(model: nn.Module, data: list[torch.Tensor]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ptqkit.quantize(model, data, PTQConfig(progress=False))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("when", ["after", "before"])
def test_a_model_loads_in_the_dtype_it_was_saved_in(tmp_path, dtype, when) -> None:
    fp32 = Net().eval()
    if when == "after":  # quantized in float32, then converted
        q = _quantize(fp32, DATA).to(dtype)
    else:  # quantized as a half / bfloat16 / double model
        q = _quantize(Net().eval().to(dtype), [x.to(dtype) for x in DATA])
    path = tmp_path / "q.safetensors"
    ptqkit.save(q, path)
    x = DATA[0].to(dtype)
    with torch.no_grad():
        want = q(x)
    for arch, says in ((Net(), True), (Net().to(dtype), False)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            loaded = ptqkit.load(path, arch)
        told = [str(w.message) for w in seen if issubclass(w.category, PTQWarning)]
        assert bool(told) == says
        if says:
            name = str(dtype).removeprefix("torch.")
            assert f"computes in {name}, the architecture given in float32" in told[0]
        with torch.no_grad():
            got = loaded(x)
        assert got.dtype == dtype and torch.equal(got, want)
        with torch.no_grad(), float_mode(loaded), float_mode(q):
            assert torch.equal(loaded(x), q(x))
        # and that is the float model, quantized: the same SQNR as the model saved
        with torch.no_grad():
            ref = fp32(DATA[0])
        assert sqnr_db(ref, got.float()) == sqnr_db(ref, want.float()) > 20.0


def test_to_dtype_keeps_the_quantization_parameters_float32() -> None:
    q = _quantize(Net().eval(), DATA)
    scales = {n: m.weight_scale.clone() for n, m in quant_layers(q).items()}
    q = q.half()
    for n, m in quant_layers(q).items():
        assert m.weight_scale.dtype == torch.float32 and torch.equal(m.weight_scale, scales[n])
        assert m.weight_fp.dtype == torch.float16 and m.weight.dtype == torch.float16
    for aq in act_quants(q).values():
        assert aq.scale.dtype == torch.float32 and aq.range.dtype == torch.float32
