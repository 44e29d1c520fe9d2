"""``export_onnx(target="tensorrt")``: a QDQ file laid out as TensorRT's explicit quantization
expects (checked structurally: no TensorRT here), numerically the simulation (ONNX Runtime runs
the same file), and refused for models quantized with asymmetric activations."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

import ptqkit
from ptqkit.errors import ExportError
from ptqkit.export import OrtModule, export_onnx
from ptqkit.export.tensorrt import violations
from ptqkit.quant.primitives import sqnr_db

SYM = ptqkit.PTQConfig(progress=False, activations=ptqkit.QuantSpec(bits=8, symmetric=True))


class ResNetLike(nn.Module):
    """conv-BN-ReLU, a residual block (conv-BN-ReLU, conv-BN, add, ReLU), depthwise conv-BN-ReLU6,
    max-pool, global pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.b3 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b0(self.c0(x)))
        x = F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        x = F.max_pool2d(F.relu6(self.b3(self.dw(x))), 2)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture(scope="module")
def resnet_like(digits_data) -> nn.Module:
    x, y = digits_data[0], digits_data[1]
    torch.manual_seed(0)
    model = ResNetLike()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for i in range(0, 640, 64):
        loss = F.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _producer(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def test_tensorrt_layout(resnet_like, calib_batches, digits_data, tmp_path):
    """Signed int8 Q/DQ with zero point 0 everywhere; Conv/Gemm read DQ(x) and DQ(int8 W), float
    biases; both inputs of the residual add are DQ; no BN left and no Q/DQ between a layer and
    its ReLU/Clip. ONNX Runtime running the file reproduces the simulation."""
    q = ptqkit.quantize(resnet_like, calib_batches, SYM)
    x = digits_data[2][:64]
    path = export_onnx(q, tmp_path / "m.trt.onnx", x[:1], target="tensorrt")
    model = onnx.load(path)
    assert violations(model) == []
    prod = _producer(model)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 4 and ops.count("Gemm") == 1
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            z = inits[n.input[2]]
            assert z.dtype == np.int8 and not z.any(), n.name
        if n.op_type in ("Conv", "Gemm"):
            assert prod[n.input[0]].op_type == "DequantizeLinear"
            w_dq = prod[n.input[1]]
            assert w_dq.op_type == "DequantizeLinear" and inits[w_dq.input[0]].dtype == np.int8
            assert inits[n.input[2]].dtype == np.float32  # the bias, float
        if n.op_type == "Add":
            assert [prod[i].op_type for i in n.input] == ["DequantizeLinear"] * 2
        if n.op_type in ("Relu", "Clip"):
            assert prod[n.input[0]].op_type in ("Conv", "Add")  # fused, nothing in between
    with torch.no_grad():
        assert sqnr_db(q(x), OrtModule(path, threads=1)(x)) > 30


def test_rules_find_what_tensorrt_cannot_take(resnet_like, calib_batches, digits_data, tmp_path):
    """The ONNX Runtime profile of the same model breaks the rules (uint8 grids, int32 biases);
    a hand-made Conv → Q → DQ → Relu and an unquantized add input are named."""
    q = ptqkit.quantize(resnet_like, calib_batches, SYM)
    ort = onnx.load(export_onnx(q, tmp_path / "m.onnx", digits_data[2][:1], weights="int8"))
    found = " | ".join(violations(ort))
    assert "not int8 with zero point 0" in found and "bias is quantized" in found

    def init(name, v):
        return numpy_helper.from_array(np.asarray(v), name)

    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xdq"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "z"], ["wdq"]),
        helper.make_node("Conv", ["xdq", "wdq"], ["c"], name="conv"),
        helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"]),
        helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["cdq"]),
        helper.make_node("Relu", ["cdq"], ["r"], name="relu"),
        helper.make_node("Add", ["r", "x"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [
            init("s", np.float32(0.1)),
            init("z", np.int8(0)),
            init("ws", np.float32(0.01)),
            init("w", np.ones((1, 1, 1, 1), np.int8)),
        ],
    )
    found = violations(helper.make_model(graph))
    assert found == [
        "Relu relu: Q/DQ between Conv and the Relu it fuses",
        "Add add: a residual add with an input not quantized",
    ]


def test_refusals(quantized_digits, digits_data, tmp_path):
    """Asymmetric activations (ptqkit's default) are refused with the config to use; no file."""
    x, path = digits_data[2][:1], tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"symmetric int8 activations.*symmetric=True"):
        export_onnx(quantized_digits, path, x, target="tensorrt")
    with pytest.raises(ExportError, match="target must be one of"):
        export_onnx(quantized_digits, path, x, target="trt")
    with pytest.raises(ExportError, match="int8 weights"):
        export_onnx(quantized_digits, path, x, target="tensorrt", weights="uint8")
    with pytest.raises(ExportError, match="format='qdq' only"):
        export_onnx(quantized_digits, path, x, target="tensorrt", format="fp32+encodings")
    assert not path.exists()
