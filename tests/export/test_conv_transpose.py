"""ConvTranspose exports as QDQ ConvTranspose: int8 weights with per-channel scales on axis 1.

ONNX Runtime 1.32's CPU provider has no integer ConvTranspose kernel: it runs the op in float on
the dequantized weights (see bench/EXPORT.md); the file still stores int8 weights, and the
runtime output matches the simulation."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

import ptqkit
from ptqkit.export import OrtModule, export_onnx, kernel_report, parity


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=4)
        self.head = nn.ConvTranspose2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.head(F.relu(self.up(F.relu(self.conv(x)))))


def test_conv_transpose_exports_as_qdq_with_int8_weights_on_axis_1(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 3, 8, 8, generator=g) for _ in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = ptqkit.quantize(Decoder().eval(), data, ptqkit.PTQConfig(progress=False))
    path = export_onnx(q, tmp_path / "dec.onnx", data[0][:1])
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    dq = {n.input[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    for name in ("up", "head"):
        w = inits[f"{name}.weight_int"]
        want = q.get_submodule(name).weight_fp.shape
        assert w.dtype in (np.int8, np.uint8) and w.shape == tuple(want)
        axis = next(a.i for a in dq[f"{name}.weight_int"].attribute if a.name == "axis")
        assert axis == 1
    assert sum(n.op_type == "ConvTranspose" for n in graph.node) == 2
    rep = kernel_report(path)
    assert rep.ops.get("QLinearConv") == 1  # the Conv; ConvTranspose runs in float (no kernel)
    res = parity(q, OrtModule(path, threads=1), data[:2])
    assert res.max_abs_diff <= 2 * res.step, res
