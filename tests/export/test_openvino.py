"""OpenVINO as a runtime of the QDQ ONNX file: ``target="openvino"`` writes int8 weights on every
CPU (checked without openvino), and, where openvino is installed, its CPU plugin runs every
conv/linear of a branch/concat/residual/depthwise net on integer kernels, with float parts
pinned to f32, agreeing with the simulation at batch 1 and 7."""

from __future__ import annotations

import onnx
import pytest
import torch
from _backends import BranchNet, needs, without

import ptqkit
from ptqkit.errors import ExportError
from ptqkit.export import weights as export_weights
from ptqkit.export.openvino import PIP, OvModule
from ptqkit.quant.primitives import sqnr_db

CFG = ptqkit.PTQConfig(progress=False)
needs_ov = needs("openvino", PIP)


@pytest.fixture(scope="module")
def qnet(calib_batches) -> torch.nn.Module:
    torch.manual_seed(0)
    return ptqkit.quantize(BranchNet().eval(), calib_batches, CFG)


def _weight_types(path) -> set[int]:
    """Element types of the initializers the graph's DequantizeLinear nodes read as weights."""
    model = onnx.load(str(path))
    inits = {i.name: i.data_type for i in model.graph.initializer}
    return {
        inits[n.input[0]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]] != 6
    }  # (6: int32 biases)


def test_openvino_target_keeps_int8_weights_where_auto_is_uint8(
    qnet, digits_data, tmp_path, monkeypatch
) -> None:
    # a CPU without VNNI: "auto" stores uint8 weights for ONNX Runtime, which OpenVINO runs
    # in float; target="openvino" keeps int8
    monkeypatch.setattr(export_weights, "int8_dot_is_exact", lambda: False)
    x = digits_data[2][:1]
    ort_file = ptqkit.export_onnx(qnet, tmp_path / "ort.onnx", x)
    ov_file = ptqkit.export_onnx(qnet, tmp_path / "ov.onnx", x, target="openvino")
    assert _weight_types(ort_file) == {onnx.TensorProto.UINT8}
    assert _weight_types(ov_file) == {onnx.TensorProto.INT8}
    with pytest.raises(ExportError, match="target='openvino' needs int8 weights"):
        ptqkit.export_onnx(qnet, tmp_path / "u8.onnx", x, target="openvino", weights="uint8")


def test_missing_openvino_names_the_pip_package(tmp_path, monkeypatch) -> None:
    without(monkeypatch, "openvino")
    with pytest.raises(ExportError, match=r"pip install 'ptqkit\[openvino\]'"):
        OvModule(tmp_path / "model.onnx")


@needs_ov
def test_openvino_runs_every_layer_int8_and_agrees(qnet, digits_data, tmp_path) -> None:
    path = ptqkit.export_onnx(qnet, tmp_path / "net.onnx", digits_data[2][:1], target="openvino")
    ov = OvModule(path, threads=1)
    assert ov.inference_precision == "f32"  # pinned: no bf16 on CPUs that have it
    prec = ov.precisions()
    assert len(prec.layers) == 6 and prec.int8 == 6, prec.summary()
    for n in (1, 7):
        x = digits_data[2][:n]
        with torch.no_grad():
            ref = qnet(x)
        got = ov(x)
        assert got.shape == ref.shape
        assert sqnr_db(ref, got) > 20.0
    with pytest.raises(ExportError, match="no ONNX file"):
        OvModule(tmp_path / "missing.onnx")
