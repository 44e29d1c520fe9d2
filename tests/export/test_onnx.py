"""ONNX QDQ export: ONNX Runtime runs every quantized layer on an integer kernel, agrees with the
simulation, and every user mistake ends in a one-line ExportError."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from _certain import certain_agreement
from onnx import numpy_helper
from torch import nn

import ptqkit
from ptqkit.errors import ExportError
from ptqkit.export import OrtModule, export_onnx, kernel_report, parity
from ptqkit.export.onnx import encodings_path
from ptqkit.quant.primitives import sqnr_db

CFG = ptqkit.PTQConfig(progress=False)


class SmallCNN(nn.Module):
    """conv-BN-ReLU, conv + residual add + ReLU, max-pool, depthwise conv-ReLU6, pointwise
    conv-ReLU, global average pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = (
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.conv2, self.relu2 = nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.dw, self.relu3 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6()
        self.pw, self.relu4 = nn.Conv2d(16, 32, 1), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.conv2(x) + x)
        x = self.relu3(self.dw(self.pool1(x)))
        x = self.relu4(self.pw(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="module")
def small_cnn(digits_data) -> nn.Module:
    """:class:`SmallCNN` trained for 4 epochs on the digits (about a second)."""
    x, y = digits_data[0], digits_data[1]
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(4):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def exported(small_cnn, calib_batches, tmp_path_factory):
    qmodel = ptqkit.quantize(small_cnn, calib_batches, CFG)
    path = export_onnx(
        qmodel, tmp_path_factory.mktemp("onnx") / "cnn.int8.onnx", calib_batches[0][:2]
    )
    return qmodel, path


def _signed(w: np.ndarray) -> np.ndarray:
    """An exported weight as signed integers: int8 as is, uint8 (zero point + 128) shifted back."""
    assert w.dtype in (np.int8, np.uint8), w.dtype
    return w if w.dtype == np.int8 else (w.astype(np.int16) - 128).astype(np.int8)


def _initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _sure(qmodel: nn.Module, batches, res) -> float:
    """The top-1 agreement ``parity`` must reach whatever model trained here (issue 27): the
    share of samples whose simulated top-2 gap exceeds twice the largest ORT-vs-simulation
    difference ``res.max_abs_diff``; where near-ties are, the kernels' one-step requantization
    differences may flip them (2 of 120 were seen on an AVX2 CPU against a band of 97%)."""
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        q = qmodel(x)
    return certain_agreement(q, q + res.max_abs_diff)


# -- fusion and numerics -------------------------------------------------------------------------
def test_every_quantized_layer_runs_on_an_integer_kernel(exported):
    _, path = exported
    rep = kernel_report(path)
    assert rep.float_nodes == [], rep.summary()
    assert rep.ops["QLinearConv"] == 4, rep.summary()  # conv1, conv2, depthwise, pointwise
    assert rep.ops["QGemm"] == 1, rep.summary()
    assert rep.ops["QLinearAdd"] == 1, rep.summary()
    assert rep.ops["QLinearGlobalAveragePool"] == 1, rep.summary()


def test_simulation_and_onnx_runtime_agree(exported, small_cnn, test_batches):
    qmodel, path = exported
    ort_model = OrtModule(path, threads=1)
    res = parity(qmodel, ort_model, test_batches)
    assert res.samples == 360
    assert res.top1_agreement >= _sure(qmodel, test_batches, res), res
    assert res.max_steps <= 2.0, res
    # deployed accuracy: the ORT model is a drop-in model (no more change than flipped classes)
    x, y = torch.cat([b[0] for b in test_batches]), torch.cat([b[1] for b in test_batches])
    acc = (ort_model(x).argmax(1) == y).double().mean().item()
    with torch.no_grad():
        acc_sim = (qmodel(x).argmax(1) == y).double().mean().item()
    assert abs(acc - acc_sim) <= 1 - res.top1_agreement / 100 + 1e-6 and acc > 0.5  # chance 0.1


def test_evaluate_reports_deployed_accuracy(exported, small_cnn, test_batches):
    _, path = exported
    ort_model = OrtModule(path, threads=1)
    res = ptqkit.evaluate(small_cnn, ort_model, test_batches, progress_bar=False)
    x = torch.cat([b[0] for b in test_batches])
    with torch.no_grad():  # against the FP32 outputs of the same model (issue 27: no band)
        f, o = small_cnn(x), ort_model(x)
    assert res.samples == 360 and sqnr_db(f, o) > 25
    assert res.agreement == pytest.approx(100 * (f.argmax(1) == o.argmax(1)).double().mean().item())
    assert abs(res.degradation) <= 100 - res.agreement + 1e-4
    assert res.size_bytes_quantized == path.stat().st_size


def test_dynamic_batch_and_int_initializers(exported, calib_batches):
    qmodel, path = exported
    ort_model = OrtModule(path, threads=1)
    for n in (1, 7):
        x = calib_batches[1][:n]
        # logits of ±10: one activation value rounded to the next 8-bit step upstream (float
        # rounding at a .5 boundary, ORT vs PyTorch) moves them by up to ~0.05; the parity test
        # above bounds the disagreement in steps
        with torch.no_grad():
            assert torch.allclose(ort_model(x), qmodel(x), atol=0.08)
    twin = copy.deepcopy(ort_model)  # the session is not copied, but made again on use
    assert torch.equal(twin(calib_batches[1][:3]), ort_model(calib_batches[1][:3]))
    inits = _initializers(path)
    for name in ("conv1", "conv2", "dw", "pw", "fc"):
        w = _signed(inits[f"{name}.weight_int"])
        assert np.array_equal(w, getattr(qmodel, name).weight_int.numpy())
    biases = [a for n, a in inits.items() if n.endswith("bias_int32")]
    assert len(biases) == 5 and all(b.dtype == np.int32 for b in biases)
    assert not any(a.dtype == np.float32 and a.size > 64 for a in inits.values())


def test_int8_file_is_under_30_percent_of_fp32(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(1024, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    ).eval()
    x = torch.randn(128, 3, 16, 16)
    qmodel = ptqkit.quantize(model, [x], CFG)
    int8 = export_onnx(qmodel, tmp_path / "m.int8.onnx", x[:1])
    fp32 = tmp_path / "m.fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:1],), str(fp32), dynamo=False, opset_version=17)
    assert int8.stat().st_size <= 0.30 * fp32.stat().st_size
    assert kernel_report(int8).float_nodes == []


def test_sub_8_bit_weights_are_exact_in_int8(calib_batches, small_cnn, tmp_path, test_batches):
    cfg = CFG.replace(weights=ptqkit.QuantSpec(bits=4, symmetric=True, per_channel=True))
    qmodel = ptqkit.quantize(small_cnn, calib_batches, cfg)
    path = export_onnx(qmodel, tmp_path / "w4.onnx", calib_batches[0][:1])
    w = _signed(_initializers(path)["conv2.weight_int"])
    assert w.min() >= -8 and w.max() <= 7
    assert np.array_equal(w, qmodel.conv2.weight_int.numpy())
    # the kernels' requantization may differ by one output step: near-ties can flip (2 of 120
    # here on an AVX2 CPU), but no output moves by more than about one step
    res = parity(qmodel, OrtModule(path, threads=1), test_batches[:1])
    assert res.top1_agreement >= _sure(qmodel, test_batches[:1], res) and res.max_steps <= 1.5, res


def test_signed_activations_run_as_uint8(calib_batches, test_batches, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(288, 10)
    ).eval()
    cfg = CFG.replace(activations=ptqkit.QuantSpec(bits=8, symmetric=True))
    qmodel = ptqkit.quantize(model, calib_batches, cfg)
    path = export_onnx(qmodel, tmp_path / "s8.onnx", calib_batches[0][:1])
    zps = [a for n, a in _initializers(path).items() if n.endswith("zero_point")]
    assert zps and all(z.dtype == np.uint8 and z == 128 for z in zps)  # int8 z=0 ≡ uint8 z=128
    rep = kernel_report(path)
    assert rep.ops["QLinearConv"] == 2 and rep.float_nodes == [], rep.summary()
    res = parity(qmodel, OrtModule(path, threads=1), test_batches)
    assert res.top1_agreement >= _sure(qmodel, test_batches, res) and res.max_steps <= 2.0, res


class ManyOps(nn.Module):
    """PReLU, dilated conv, Hardswish, ZeroPad2d, SiLU, concat, nearest and bilinear upsampling,
    Sigmoid, a Linear on a 3-D input (MatMul + Add)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.prelu = nn.Conv2d(1, 8, 3, padding=1), nn.PReLU(8)
        self.dil, self.hs = nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.Hardswish()
        self.pad, self.c3, self.silu = nn.ZeroPad2d((1, 0, 1, 0)), nn.Conv2d(8, 8, 2), nn.SiLU()
        self.up, self.c4 = nn.Upsample(scale_factor=2), nn.Conv2d(16, 8, 3, stride=2, padding=1)
        self.upb = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.c5, self.sig = nn.Conv2d(8, 4, 1), nn.Sigmoid()
        self.tok, self.fc = nn.Linear(256, 8), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.prelu(self.c1(x))
        b = self.hs(self.dil(a))
        c = self.silu(self.c3(self.pad(b)))
        d = self.c4(self.up(torch.cat([c, b], 1)))
        e = self.sig(self.c5(self.upb(d)))
        return self.fc(self.tok(e.flatten(2)).flatten(1))


def test_other_ops_export_as_float_between_dq_and_q(calib_batches, test_batches, tmp_path):
    torch.manual_seed(0)
    qmodel = ptqkit.quantize(ManyOps().eval(), calib_batches, CFG.replace(skip=("c3",)))
    path = export_onnx(qmodel, tmp_path / "ops.onnx", calib_batches[0][:1])
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"PRelu", "Resize", "Concat", "Sigmoid", "MatMul"} <= ops
    assert "Pad" not in ops  # folded into the conv that follows it
    rep = kernel_report(path)
    assert rep.float_nodes == [("Conv", "/c3/Conv")], rep.summary()  # the skipped layer only
    assert rep.ops["QLinearConv"] == 4 and rep.ops["QLinearConcat"] == 1, rep.summary()
    assert rep.ops["MatMulIntegerToFloat"] == 1, rep.summary()
    res = parity(qmodel, OrtModule(path, threads=1), test_batches)
    assert res.top1_agreement >= _sure(qmodel, test_batches, res) and res.max_steps <= 3.0, res


def test_bias_of_a_near_zero_channel_fits_int32(calib_batches, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
    with torch.no_grad():
        model[0].weight[1] = 1e-9 * torch.randn_like(model[0].weight[1])  # a dead channel
        model[0].bias[1] = 0.5
    qmodel = ptqkit.quantize(model, calib_batches, CFG)
    path = export_onnx(qmodel, tmp_path / "dead.onnx", calib_batches[0][:1])
    bias = next(a for n, a in _initializers(path).items() if n.endswith("bias_int32"))
    assert np.abs(bias.astype(np.int64)).max() < 2**31 - 1
    x = calib_batches[1]
    with torch.no_grad():
        assert torch.allclose(OrtModule(path, threads=1)(x), qmodel(x), atol=0.02)


def test_fp32_plus_encodings(exported, calib_batches, tmp_path):
    qmodel, _ = exported
    path = export_onnx(qmodel, tmp_path / "m.onnx", calib_batches[0][:1], format="fp32+encodings")
    graph = onnx.load(str(path)).graph
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in graph.node}
    enc = json.loads(encodings_path(path).read_text())
    assert len(enc["activations"]) >= 6 and len(enc["params"]) == 10  # 5 weights + 5 biases
    w = next(v for k, v in enc["params"].items() if k.startswith("conv2.weight"))
    assert w["dtype"] == "int8" and w["axis"] == 0 and len(w["scale"]) == 16
    x = calib_batches[1]
    with torch.no_grad(), ptqkit.quant.modules.float_mode(qmodel):
        ref = qmodel(x)
    assert torch.allclose(OrtModule(path, threads=1)(x), ref, atol=0.1)


# -- errors ---------------------------------------------------------------------------------------
def test_errors_name_the_problem(exported, calib_batches, tmp_path):
    qmodel, _ = exported
    x = calib_batches[0][:1]
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(qmodel, tmp_path / "missing" / "m.onnx", x)
    with pytest.raises(ExportError, match="is a folder"):
        export_onnx(qmodel, tmp_path, x)
    with pytest.raises(ExportError, match=r"example input of shape \(1, 3, 8, 8\)"):
        export_onnx(qmodel, tmp_path / "m.onnx", torch.zeros(1, 3, 8, 8))
    with pytest.raises(ExportError, match="not a ptqkit quantized model"):
        export_onnx(nn.Sequential(nn.Linear(4, 2)), tmp_path / "m.onnx", torch.zeros(1, 4))
    with pytest.raises(ExportError, match="opset"):
        export_onnx(qmodel, tmp_path / "m.onnx", x, opset=11)
    assert not (tmp_path / "m.onnx").exists()


def test_non_8_bit_activations_are_refused(small_cnn, calib_batches, tmp_path):
    cfg = CFG.replace(activations=ptqkit.QuantSpec(bits=4, symmetric=False))
    qmodel = ptqkit.quantize(small_cnn, calib_batches, cfg)
    with pytest.raises(ExportError, match=r"4 bits.*8-bit activations only"):
        export_onnx(qmodel, tmp_path / "a4.onnx", calib_batches[0][:1])


class _Bessel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.i1e(x)


def test_unsupported_op_names_op_and_module(calib_batches, tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), _Bessel(), nn.Flatten(), nn.Linear(144, 2))
    qmodel = ptqkit.quantize(model.eval(), calib_batches, CFG)
    with pytest.raises(ExportError, match=r"aten::special_i1e in module '2' \(_Bessel\)") as e:
        export_onnx(qmodel, tmp_path / "x.onnx", calib_batches[0][:1])
    assert "\n" not in str(e.value)


def test_ort_module_rejects_a_missing_file(tmp_path):
    with pytest.raises(ExportError, match="no ONNX file"):
        OrtModule(tmp_path / "nothing.onnx")
