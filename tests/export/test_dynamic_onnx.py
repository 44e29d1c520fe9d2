"""``export_onnx`` of dynamic activations (:mod:`ptqkit.export.onnx_dynamic`): every dynamic
Linear becomes ``MatMulInteger`` (per tensor 8-bit asymmetric: ONNX Runtime's own
``DynamicQuantizeLinear`` form, which it fuses as it fuses ``quantize_dynamic``'s output), ONNX
Runtime's output agrees with the simulation, and the exports that cannot state run-time scales
refuse them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptqkit
from ptqkit import PTQConfig, QuantSpec
from ptqkit.errors import ExportError
from ptqkit.export.onnx import export_onnx
from ptqkit.quant.primitives import sqnr_db


class Block(nn.Module):
    """A pre-LN transformer block (as tests/quant/test_dynamic.py's): q/k/v/o Linears, two
    activation matmuls, an MLP, residual adds."""

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


def tokens(n: int, seed: int, outliers: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 32, generator=g)
    if outliers:
        x[:, 0] *= 300.0  # one huge token per sequence
    return x


DYN = {
    "tensor_u8": QuantSpec(bits=8, symmetric=False, dynamic=True),
    "row_u8": QuantSpec(bits=8, symmetric=False, per_channel=True, dynamic=True),
    "row_s8": QuantSpec(bits=8, symmetric=True, per_channel=True, dynamic=True),
    "row_u6": QuantSpec(bits=6, symmetric=False, per_channel=True, dynamic=True),
}


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    return Block().eval()


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def _run(path, x: torch.Tensor, optimized: str | None = None) -> np.ndarray:
    so = ort.SessionOptions()
    if optimized:
        so.optimized_model_filepath = optimized
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("weights", ["auto", "uint8"])
@pytest.mark.parametrize("name", list(DYN))
def test_all_dynamic_matches_the_simulation(block, tmp_path, name, weights):
    """All Linears dynamic (attention matmuls and adds float): ORT sums the same integers
    exactly in int32 where the simulation sums float products, so the outputs differ by float
    rounding only: measured max |ORT - sim| / max |sim| ~1e-7; bound 1e-4. ``weights='uint8'``
    is the container of x86 CPUs without VNNI (exact there too); 'auto' picks this CPU's."""
    spec = DYN[name]
    q = ptqkit.quantize(block, [tokens(8, 0)], PTQConfig(progress=False, activations=spec))
    x = tokens(5, 3, outliers=True)
    path = export_onnx(q, tmp_path / "m.onnx", x[:1], weights=weights)
    model = onnx.load(path)
    ops = _ops(model)
    assert ops["MatMulInteger"] == len(LINEARS)  # every Linear on an integer kernel
    assert ops.get("MatMul", 0) == 2  # the two activation x activation matmuls, in float
    assert ops.get("DynamicQuantizeLinear", 0) == (len(LINEARS) if name == "tensor_u8" else 0)
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "MatMulInteger":
            w = inits[n.input[1]]
            assert w.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
            assert weights != "uint8" or w.data_type == onnx.TensorProto.UINT8
    got = _run(path, x)
    with torch.no_grad():
        sim = q(x).numpy()
    assert np.abs(got - sim).max() <= 1e-4 * np.abs(sim).max()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_per_tensor_is_fused_as_onnxruntime_fuses_quantize_dynamic(block, tmp_path):
    """ONNX Runtime's graph optimizer turns the per-tensor export into its own fused ops
    (DynamicQuantizeMatMul / MatMulIntegerToFloat), as it does ``quantize_dynamic``'s output
    of the same block: the same kernels run."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    q = ptqkit.quantize(
        block, [tokens(8, 0)], PTQConfig(progress=False, activations=DYN["tensor_u8"])
    )
    x = tokens(1, 3)
    ours = export_onnx(q, tmp_path / "ours.onnx", x)
    fp32 = tmp_path / "fp32.onnx"
    torch.onnx.export(
        block,
        (x,),
        str(fp32),
        dynamo=False,
        input_names=["input"],
        dynamic_axes={"input": {0: "batch"}},
    )
    theirs = tmp_path / "ort.onnx"
    quantize_dynamic(str(fp32), str(theirs), per_channel=True, weight_type=QuantType.QInt8)
    fused = {}
    for label, p in (("ours", ours), ("theirs", theirs)):
        opt = str(tmp_path / f"{label}.opt.onnx")
        _run(p, x, opt)
        ops = _ops(onnx.load(opt))
        fused[label] = {k: v for k, v in ops.items() if "Integer" in k or "Quantize" in k}
    assert fused["ours"] == fused["theirs"]
    assert (
        sum(fused["ours"].get(k, 0) for k in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat")) == 6
    )


def test_mixed_static_and_dynamic(block, tmp_path):
    """Dynamic Linears beside static Q/DQ on the attention matmuls and residual adds: one file,
    both forms. A float rounding difference can move a static quantizer's value across a
    rounding tie (one grid step): bound 40 dB SQNR vs the simulation (measured: identical)."""
    cfg = PTQConfig(progress=False, scopes=[("Linear", {"activations": DYN["row_u8"]})])
    q = ptqkit.quantize(block, [tokens(8, i) for i in range(4)], cfg)
    x = tokens(5, 3)
    path = export_onnx(q, tmp_path / "m.onnx", x[:1])
    ops = _ops(onnx.load(path))
    assert ops["MatMulInteger"] == len(LINEARS) and ops["QuantizeLinear"] > 0
    with torch.no_grad():
        sim = q(x)
    assert sqnr_db(sim, torch.from_numpy(_run(path, x))) > 40.0


def test_exports_that_cannot_state_run_time_scales_refuse(block, tmp_path):
    q = ptqkit.quantize(block, [tokens(8, 0)], PTQConfig(progress=False, activations=DYN["row_s8"]))
    x = tokens(1, 0)
    with pytest.raises(ExportError, match=r"dynamic.*format='qdq'"):
        export_onnx(q, tmp_path / "a.onnx", x, format="fp32+encodings")
    with pytest.raises(ExportError, match=r"dynamic.*target='tensorrt'"):
        export_onnx(q, tmp_path / "b.onnx", x, target="tensorrt")
    from ptqkit.export.pt2 import export_pt2

    with pytest.raises(ExportError, match=r"input_quant .*dynamic.*export_onnx writes it"):
        export_pt2(q, x)
    assert not list(tmp_path.iterdir())  # nothing written
    wide = ptqkit.quantize(
        block,
        [tokens(8, 0)],
        PTQConfig(progress=False, activations=QuantSpec(bits=12, per_channel=True, dynamic=True)),
    )
    with pytest.raises(ExportError, match="12 bits; MatMulInteger takes 8-bit"):
        export_onnx(wide, tmp_path / "c.onnx", x)
