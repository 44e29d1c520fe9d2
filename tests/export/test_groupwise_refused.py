"""Group-wise weights in ONNX: a weight-only Linear (float input) is written as MatMulNBits
(tests/export/test_matmulnbits.py); a group-wise layer whose input is statically quantized
(W4A8 QDQ) has no ONNX form with integer kernels and is refused, naming the layer, and nothing
is written."""

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.config import PTQConfig, QuantSpec
from ptqkit.errors import ExportError


def test_groupwise_layer_is_refused(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    data = [torch.randn(8, 64) for _ in range(2)]
    w4g = QuantSpec(bits=4, per_channel=True, group_size=16)
    cfg = PTQConfig(scopes=[("2", {"weights": w4g})], progress=False)
    q = ptqkit.quantize(model, data, cfg)
    path = tmp_path / "m.onnx"
    with pytest.raises(
        ExportError, match=r"layer 2 has group-wise weights \(group_size=16.*input is quantized"
    ):
        ptqkit.export_onnx(q, path, torch.randn(1, 64))
    assert not path.exists()
    plain = ptqkit.quantize(model, data, PTQConfig(progress=False))
    ptqkit.export_onnx(plain, path, torch.randn(1, 64))  # the same model per channel exports
    assert path.exists()
    weight_only = ptqkit.quantize(
        model, data, PTQConfig(activations=None, weights=w4g, progress=False)
    )
    path.unlink()
    ptqkit.export_onnx(weight_only, path, torch.randn(1, 64))  # float input: MatMulNBits
    assert path.exists()
