"""Weight-only Linears exported as ONNX Runtime's ``MatMulNBits`` or as ``DequantizeLinear``
with ``block_size`` + ``MatMul`` (:mod:`ptqkit.export.onnx_nbits`): ONNX Runtime's output
agrees with the simulation (both compute ``x · Ŵᵀ + b`` in float32 from the same integers),
the packed file is small, and what cannot be written is refused by name."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import ptqkit
from ptqkit import PTQConfig, QuantSpec
from ptqkit.errors import ExportError
from ptqkit.export.onnx import export_onnx
from ptqkit.export.runtime import session_options
from ptqkit.quant.primitives import sqnr_db


def _mlp(k: int = 256, h: int = 128, n: int = 64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, h), nn.GELU(), nn.Linear(h, n)).eval()


def _quantize(model: nn.Module, k: int, **spec) -> nn.Module:
    cfg = PTQConfig(activations=None, weights=QuantSpec(per_channel=True, **spec), progress=False)
    return ptqkit.quantize(model, [torch.randn(8, k)], cfg)


def _run(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


def _ops(path) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in onnx.load(path).graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


@pytest.mark.parametrize("form", ["matmulnbits", "qdq"])
@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_runtime_matches_the_simulation(tmp_path, form, group, symmetric):
    """W4 MLP (two Linears with bias, a 3-D input): measured max |ORT - sim| ~3e-7 (outputs
    ~1): bound 1e-5 · max |sim|. Every Linear is one MatMulNBits (or one block DQ + MatMul)."""
    q = _quantize(_mlp(), 256, bits=4, symmetric=symmetric, group_size=group)
    x = torch.randn(3, 5, 256)
    path = export_onnx(q, tmp_path / "m.onnx", x[:1], weight_only=form)
    ops = _ops(path)
    if form == "matmulnbits":
        assert ops["MatMulNBits"] == 2 and "DequantizeLinear" not in ops
    else:
        assert ops["DequantizeLinear"] == 2 and ops["MatMul"] == 2
        assert onnx.load(path).opset_import[0].version == 21
    with torch.no_grad():
        sim, fp = q(x), _mlp()(x)
    got = _run(path, x)
    assert np.abs(got - sim.numpy()).max() <= 1e-5 * np.abs(sim.numpy()).max()
    assert sqnr_db(fp, torch.from_numpy(got)) > 10.0  # 4-bit weights, not a different function


@pytest.mark.parametrize("bits,container", [(2, 2), (3, 4), (8, 8)])
def test_other_widths(tmp_path, bits, container):
    """MatMulNBits' CPU kernel takes 2, 4 and 8 bits; 3-bit weights go in the 4-bit container
    (exact); the DQ form stores 2/3 bits in int4."""
    q = _quantize(_mlp(), 256, bits=bits, group_size=32)
    x = torch.randn(4, 256)
    with torch.no_grad():
        sim = q(x).numpy()
    for form in ("matmulnbits", "qdq"):
        path = export_onnx(q, tmp_path / f"{form}.onnx", x[:1], weight_only=form)
        assert np.abs(_run(path, x) - sim).max() <= 1e-5 * np.abs(sim).max()
    nodes = [n for n in onnx.load(tmp_path / "matmulnbits.onnx").graph.node]
    attrs = [{a.name: a.i for a in n.attribute} for n in nodes if n.op_type == "MatMulNBits"]
    assert [a["bits"] for a in attrs] == [container, container]


def test_k_not_divisible_by_the_block(tmp_path):
    """K = 100, g = 32: the last group has 4 weights; both forms pad the last block (handled,
    agrees). A group size that is not a power of two >= 16 (48) has no MatMulNBits form:
    ExportError naming the layer, nothing written; the DQ form takes it."""
    x = torch.randn(4, 100)
    q = _quantize(_mlp(100, 48, 20), 100, bits=4, symmetric=False, group_size=32)
    with torch.no_grad():
        sim = q(x).numpy()
    for form in ("matmulnbits", "qdq"):
        path = export_onnx(q, tmp_path / f"{form}.onnx", x[:1], weight_only=form)
        assert np.abs(_run(path, x) - sim).max() <= 1e-5 * np.abs(sim).max()
    odd = _quantize(_mlp(96, 48, 20), 96, bits=4, group_size=48)
    x = torch.randn(4, 96)
    with pytest.raises(ExportError, match=r"layer 0: group_size=48: MatMulNBits needs .*power"):
        export_onnx(odd, tmp_path / "odd.onnx", x[:1])
    assert not (tmp_path / "odd.onnx").exists()
    path = export_onnx(odd, tmp_path / "odd.onnx", x[:1], weight_only="qdq")
    with torch.no_grad():
        sim = odd(x).numpy()
    assert np.abs(_run(path, x) - sim).max() <= 1e-5 * np.abs(sim).max()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_file_holds_packed_bytes(tmp_path):
    """A 1024×1024 Linear, W4 g32: ``N·K/2`` bytes of weights + ``N·K/32`` float scales
    (655 KB) plus a small overhead, ≥ 3× smaller than the FP32 file (4.2 MB)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024)).eval()
    x = torch.randn(2, 1024)
    fp32 = tmp_path / "fp32.onnx"
    torch.onnx.export(model, (x,), str(fp32), dynamo=False, input_names=["input"])
    q = _quantize(model, 1024, bits=4, group_size=32)
    packed = 1024 * 1024 // 2 + 1024 * 1024 // 32 * 4 + 1024 * 4
    for form in ("matmulnbits", "qdq"):
        size = export_onnx(q, tmp_path / f"{form}.onnx", x[:1], weight_only=form).stat().st_size
        assert packed <= size <= packed + 4096
        assert fp32.stat().st_size >= 3 * size


def test_bad_form_and_static_groupwise_refused(tmp_path):
    q = _quantize(_mlp(), 256, bits=4, group_size=32)
    with pytest.raises(ExportError, match="weight_only must be one of"):
        export_onnx(q, tmp_path / "m.onnx", torch.randn(1, 256), weight_only="int4")
    with pytest.raises(ExportError, match="group-wise weights"):
        export_onnx(q, tmp_path / "m.onnx", torch.randn(1, 256), format="fp32+encodings")
    wide = _quantize(_mlp(), 256, bits=4, group_size=32).double()
    with pytest.raises(ExportError, match=r"layer 0: weight-only export writes float32"):
        export_onnx(wide, tmp_path / "m.onnx", torch.randn(1, 256).double())
    assert not list(tmp_path.iterdir())
