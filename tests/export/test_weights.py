"""The weight container of the export: int8 or uint8 (the same values, zero point + 128), chosen
so that ONNX Runtime's integer kernels do not saturate on CPUs without VNNI."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import ptqkit
from ptqkit.errors import ExportError
from ptqkit.export import export_onnx, weights
from ptqkit.export.weights import resolve_weight_dtype

CFG = ptqkit.PTQConfig(progress=False)


def _run(path, x: np.ndarray, optimize: bool) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def wide_conv(tmp_path_factory):
    """A conv whose int8 weights sit at ±127 next to each other and whose input is large: the
    case where a saturating int16 pair sum (u8×s8 without VNNI) is wrong."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 36, 10))
    with torch.no_grad():
        model[0].weight.copy_(torch.sign(torch.randn_like(model[0].weight)))
    model.eval()
    x = torch.randn(64, 16, 6, 6) * 3
    qmodel = ptqkit.quantize(model, [x[:32], x[32:]], CFG)
    folder = tmp_path_factory.mktemp("weights")
    paths = {
        w: export_onnx(qmodel, folder / f"{w}.onnx", x[:2], weights=w) for w in ("int8", "uint8")
    }
    return qmodel, x, paths


def test_uint8_weights_hold_the_same_values(wide_conv):
    _, x, paths = wide_conv
    inits = {
        w: {t.name: numpy_helper.to_array(t) for t in onnx.load(str(p)).graph.initializer}
        for w, p in paths.items()
    }
    for name in ("0.weight_int", "2.weight_int"):
        s8, u8 = inits["int8"][name], inits["uint8"][name]
        assert s8.dtype == np.int8 and u8.dtype == np.uint8
        assert np.array_equal(u8.astype(np.int16) - 128, s8.astype(np.int16))
    # the reference (unfused) evaluation of both files is the same function
    ref8 = _run(paths["int8"], x.numpy(), optimize=False)
    refu = _run(paths["uint8"], x.numpy(), optimize=False)
    assert np.array_equal(ref8, refu)


def test_uint8_weights_run_exactly_on_integer_kernels(wide_conv):
    qmodel, x, paths = wide_conv
    with torch.no_grad():
        sim = qmodel(x).numpy()
    fused = _run(paths["uint8"], x.numpy(), optimize=True)
    step = float(sim.max() - sim.min()) / 255
    assert np.abs(fused - sim).max() <= 2 * step
    assert (fused.argmax(1) == sim.argmax(1)).mean() >= 0.98


@pytest.mark.skipif(weights.int8_dot_is_exact(), reason="this CPU has VNNI: u8×s8 is exact")
def test_int8_weights_saturate_without_vnni(wide_conv):
    """Why ``auto`` exists: on this CPU the u8×s8 kernels clip the pair sums of this layer."""
    qmodel, x, paths = wide_conv
    with torch.no_grad():
        sim = qmodel(x).numpy()
    fused = _run(paths["int8"], x.numpy(), optimize=True)
    assert np.abs(fused - sim).max() > 2 * float(sim.max() - sim.min()) / 255


def test_auto_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(weights, "int8_dot_is_exact", lambda: True)
    assert resolve_weight_dtype("auto") == "int8"
    monkeypatch.setattr(weights, "int8_dot_is_exact", lambda: False)
    assert resolve_weight_dtype("auto") == "uint8"
    assert resolve_weight_dtype("int8") == "int8"
    with pytest.raises(ExportError, match="weights must be one of"):
        resolve_weight_dtype("int4")


def test_cpu_flags_decide(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse avx2 fma\n")
    assert weights._cpu_flags(info) == {"fpu", "sse", "avx2", "fma"}
    assert weights._cpu_flags(tmp_path / "missing") is None
    monkeypatch.setattr(weights.platform, "machine", lambda: "aarch64")
    weights.int8_dot_is_exact.cache_clear()
    try:
        assert weights.int8_dot_is_exact()
        monkeypatch.setattr(weights.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(weights, "_cpu_flags", lambda: {"avx2", "avx512_vnni"})
        weights.int8_dot_is_exact.cache_clear()
        assert weights.int8_dot_is_exact()
        monkeypatch.setattr(weights, "_cpu_flags", lambda: {"avx2"})
        weights.int8_dot_is_exact.cache_clear()
        assert not weights.int8_dot_is_exact()
    finally:
        weights.int8_dot_is_exact.cache_clear()
