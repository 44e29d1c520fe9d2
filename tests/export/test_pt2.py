"""torch.export with pt2e Q/DQ ops: the program carries ptqkit's integers and grids, reproduces
the simulation (bit for bit where ``1/s`` is exact), keeps a dynamic batch, saves and loads, has
Q/DQ where ptqkit put its quantizers, and Inductor runs its conv/linear on oneDNN int8 kernels."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptqkit
from ptqkit.errors import ExportError, PTQWarning
from ptqkit.export.pt2 import compile_int8, export_pt2, load_pt2, program_report
from ptqkit.export.pt2 import modules as pt2_modules
from ptqkit.quant.modules import act_quants, quant_layers
from ptqkit.quant.primitives import sqnr_db

CFG = ptqkit.PTQConfig(progress=False)


class BranchNet(nn.Module):
    """conv-BN-ReLU stem, two branches (1×1 conv-ReLU; depthwise conv-ReLU6 → pointwise conv),
    their concat, a conv with a residual add + ReLU, max-pool, global pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 1)
        self.dw, self.pw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1)
        self.mix = nn.Conv2d(16, 16, 3, padding=1)
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        c = torch.cat([F.relu(self.a(x)), self.pw(F.relu6(self.dw(x)))], 1)
        x = self.pool(F.relu(self.mix(c) + c))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture(scope="module")
def branch_net(digits_data) -> nn.Module:
    """:class:`BranchNet` trained for 3 epochs on the digits (well under a second)."""
    x, y = digits_data[0], digits_data[1]
    torch.manual_seed(0)
    model = BranchNet()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(3):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - 1, 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def q_branch(branch_net, calib_batches) -> nn.Module:
    return ptqkit.quantize(branch_net, calib_batches, CFG)


def pow2_scales(qmodel: nn.Module) -> nn.Module:
    """A copy whose activation scales are powers of two: ``x·(1/s)`` (the op) is then exactly
    ``x/s`` (ptqkit), so program and simulation must agree bit for bit."""
    q = copy.deepcopy(qmodel)
    for aq in act_quants(q).values():
        aq.scale = torch.exp2(torch.round(torch.log2(aq.scale)))
    return q


def _x(digits_data, n: int) -> torch.Tensor:
    return digits_data[2][:n]


# -- agreement with the simulation ---------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["quantized_digits", "q_branch"])
def test_program_is_the_simulation_bit_for_bit(model_name, request, digits_data):
    """Power-of-two scales (grids equal, ``1/s`` exact): identical outputs at batch 1, 7 and 360,
    the program traced from a batch-1 example (dynamic batch)."""
    q = pow2_scales(request.getfixturevalue(model_name))
    program = export_pt2(q, _x(digits_data, 1))
    run = program.module()
    with torch.no_grad():
        for n in (1, 7, 360):
            x = _x(digits_data, n)
            assert torch.equal(run(x), q(x)), n


def test_real_scales_within_one_step_per_quantizer(quantized_digits, digits_data):
    """With real scales the op's ``x·(1/s)`` and ptqkit's ``x/s`` can round a near-tie apart: each
    quantizer's output differs from the simulation's by at most one step, and rarely."""
    x = _x(digits_data, 360)
    for aq in act_quants(quantized_digits).values():
        qdq = pt2_modules.QDQ(aq)
        t = torch.randn(20000) * 3 * float(aq.scale) * 255 / 4
        step = ((qdq(t) - aq(t)).abs() / aq.scale).round()
        assert step.max() <= 1 and step.ne(0).float().mean() < 1e-3
    program = export_pt2(quantized_digits, x[:1])
    with torch.no_grad():
        ref, got = quantized_digits(x), program.module()(x)
    assert sqnr_db(ref, got) > 30
    assert (ref.argmax(1) == got.argmax(1)).float().mean() > 0.95


def test_program_holds_ptqkit_integers(q_branch, digits_data):
    program = export_pt2(q_branch, _x(digits_data, 2))
    state = program.state_dict
    for name, layer in quant_layers(q_branch).items():
        w = state[f"{name}.weight_int"]
        assert w.dtype == torch.int8 and torch.equal(w, layer.weight_int)
        assert torch.equal(state[f"{name}.weight_scale"], layer.weight_scale)
    scales = {}
    for n in program.graph.nodes:
        if n.op == "call_function" and n.target.__name__.split(".")[0] == "quantize_per_tensor":
            scales[n.args[1]] = n.args[2:]
    for aq in act_quants(q_branch).values():
        assert scales[float(aq.scale)] == (int(aq.zero_point), 0, 255, torch.uint8)


# -- structure -----------------------------------------------------------------------------------
def _users(node) -> set[str]:
    return {u.target.__name__.split(".")[0] for u in node.users if u.op == "call_function"}


def test_qdq_structure_per_layer(q_branch, digits_data):
    """Every conv/linear: an int8 weight constant → dequantize_per_channel (axis 0, [-128, 127]),
    its input a dequantize_per_tensor; one Q per active quantizer, one DQ per Q plus one per
    weight; add, cat and max-pool read DQ outputs."""
    program = export_pt2(q_branch, _x(digits_data, 2))
    report = program_report(program)
    assert len(report.layers) == 6 and report.int8_layers == 6 and not report.float_layers
    n_act = sum(aq.mode == "quant" for aq in act_quants(q_branch).values())
    assert report.quantize == n_act and report.dequantize == n_act + 6
    by_name = {n.name: n for n in program.graph.nodes}
    for layer in report.layers:
        w = by_name[layer.node].args[1]
        assert w.target.__name__.startswith("dequantize_per_channel")
        assert w.args[3:7] == (0, -128, 127, torch.int8)
    seen = []
    for n in program.graph.nodes:
        name = getattr(n.target, "__name__", "").split(".")[0]
        if name in ("add", "cat", "max_pool2d"):
            ins = {"cat": n.args[0], "add": n.args[:2]}.get(name, n.args[:1])
            assert all(i.target.__name__.startswith("dequantize_per_tensor") for i in ins), n
            seen.append(name)
    assert sorted(seen) == ["add", "cat", "max_pool2d"]


def test_float_layer_between_dq_and_q(branch_net, calib_batches, digits_data):
    """A layer kept float (skip) is a float conv on a DQ'd input whose output is quantized again,
    counted as float by the report."""
    q = ptqkit.quantize(branch_net, calib_batches, ptqkit.PTQConfig(progress=False, skip=("mix",)))
    program = export_pt2(q, _x(digits_data, 2))
    report = program_report(program)
    assert len(report.float_layers) == 1 and report.int8_layers == 5
    node = {n.name: n for n in program.graph.nodes}[report.float_layers[0]]
    assert node.args[0].target.__name__.startswith("dequantize_per_tensor")
    assert node.args[1].op == "placeholder"  # the float weight
    assert _users(node) == {"quantize_per_tensor"}
    with torch.no_grad():
        x = _x(digits_data, 7)
        assert sqnr_db(q(x), program.module()(x)) > 30


def test_narrow_grids_and_symmetric_activations(branch_net, calib_batches, digits_data):
    """4-bit weights stay in the int8 container with quant_min/max -8/7; symmetric int8
    activations are int8 [-128, 127] with zero point 0. Bit for bit with power-of-two scales."""
    cfg = ptqkit.PTQConfig(
        progress=False,
        weights=ptqkit.QuantSpec(bits=4, symmetric=True, per_channel=True),
        activations=ptqkit.QuantSpec(bits=8, symmetric=True),
    )
    q = pow2_scales(ptqkit.quantize(branch_net, calib_batches, cfg))
    program = export_pt2(q, _x(digits_data, 3))
    for n in program.graph.nodes:
        name = getattr(n.target, "__name__", "")
        if name.startswith("dequantize_per_channel"):
            assert n.args[4:7] == (-8, 7, torch.int8)
        elif name.startswith("quantize_per_tensor"):
            assert n.args[2:] == (0, -128, 127, torch.int8)
    x = _x(digits_data, 50)
    with torch.no_grad():
        assert torch.equal(program.module()(x), q(x))


class SamePadConv(nn.Conv2d):
    """A "same padding" stride-2 conv that pads inside its own forward (EfficientNet's
    ``Conv2dStaticSamePadding``): the program reads ``DQ → pad → conv``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, [0, 1, 0, 1]))


def test_conv_behind_a_pad_gets_its_own_qdq(calib_batches, digits_data):
    """``DQ → pad(0) → conv`` and ``DQ → max_pool → flatten → linear`` get an exact ``Q → DQ``
    before the layer (the int8 pattern), bit for bit with the simulation."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), SamePadConv(8, 8, 3, stride=2), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32, 10),
    ).eval()
    q = pow2_scales(ptqkit.quantize(model, calib_batches, CFG))
    program = export_pt2(q, _x(digits_data, 1))
    report = program_report(program)
    assert (len(report.layers), report.int8_layers) == (3, 3)
    n_act = sum(aq.mode == "quant" for aq in act_quants(q).values())
    assert report.quantize == n_act + 2  # one requantization before each of the two
    x = _x(digits_data, 7)
    with torch.no_grad():
        assert torch.equal(program.module()(x), q(x))


# -- save / load ---------------------------------------------------------------------------------
def test_saved_and_loaded(quantized_digits, digits_data, tmp_path):
    path = tmp_path / "digits.int8.pt2"
    program = export_pt2(quantized_digits, _x(digits_data, 1), path)
    x = _x(digits_data, 7)
    with torch.no_grad():
        want = program.module()(x)
        for loaded in (load_pt2(path), torch.export.load(path)):
            assert torch.equal(loaded.module()(x), want)
    assert [p.name for p in tmp_path.iterdir()] == ["digits.int8.pt2"]  # no temporary left


# -- bad input -----------------------------------------------------------------------------------
def test_refusals(digits_cnn, quantized_digits, calib_batches, digits_data, tmp_path):
    x = _x(digits_data, 2)
    with pytest.raises(ExportError, match="not a ptqkit quantized model"):
        export_pt2(digits_cnn, x)
    with pytest.raises(ExportError, match="does not exist"):
        export_pt2(quantized_digits, x, tmp_path / "missing" / "m.pt2")
    with pytest.raises(ExportError, match="rejects the example"):
        export_pt2(quantized_digits, torch.zeros(2, 3, 8, 8))
    with pytest.raises(ExportError, match="no such file"):
        load_pt2(tmp_path / "none.pt2")
    cfg = ptqkit.PTQConfig(
        progress=False, weights=ptqkit.QuantSpec(bits=4, per_channel=True, group_size=8)
    )
    grouped = ptqkit.quantize(digits_cnn, calib_batches, cfg)
    with pytest.raises(ExportError, match="group-wise weights"):
        export_pt2(grouped, x)


def test_missing_backend_is_one_line(quantized_digits, digits_data, monkeypatch):
    monkeypatch.setattr(pt2_modules, "OP_MODULES", ("ptqkit_no_such_module",))
    monkeypatch.setattr(pt2_modules.torch.ops, "quantized_decomposed", object())
    with pytest.raises(ExportError, match="pip install torchao") as err:
        export_pt2(quantized_digits, _x(digits_data, 2))
    assert "\n" not in str(err.value)


# -- Inductor int8 -------------------------------------------------------------------------------
@pytest.mark.skipif(
    not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()),
    reason="torch.backends.mkldnn is off: Inductor has no oneDNN int8 kernels to lower onto",
)
def test_inductor_runs_int8_kernels(q_branch, branch_net, calib_batches, digits_data):
    """Freezing on: every conv/linear becomes a oneDNN int8 kernel (6 of 6); a float-kept layer
    stays a float kernel, counted, with a warning. Outputs agree with the simulation at batch 7
    and 1 (a new batch size recompiles under the same settings)."""
    x = _x(digits_data, 7)
    compiled = compile_int8(export_pt2(q_branch, x), (x,))
    k = compiled.kernels
    assert (k.layers, k.int8, k.float) == (6, 6, 0) and k.all_int8
    assert set(k.kernels) <= {"qconv_pointwise", "qlinear_pointwise"}
    with torch.no_grad():
        for n in (7, 1):
            assert sqnr_db(q_branch(x[:n]), compiled(x[:n])) > 30
    q = ptqkit.quantize(branch_net, calib_batches, ptqkit.PTQConfig(progress=False, skip=("mix",)))
    with pytest.warns(PTQWarning, match="5/6 conv/linear"):
        compiled = compile_int8(export_pt2(q, x))  # the program's own example input
    assert (compiled.kernels.int8, compiled.kernels.float) == (5, 1)
    assert math.isfinite(sqnr_db(q(x), compiled(x)))
    with pytest.raises(ExportError, match="ExportedProgram"):
        compile_int8(q)  # type: ignore[arg-type]


def test_kernel_count_reads_every_float_conv_form():
    """Float convs as Inductor writes them with freezing (seen in its code for conv → ReLU → conv
    + a depthwise conv added in place), int8 ones, and a comment line that must not count."""
    from ptqkit.export.pt2.inductor import count_kernels

    code = "\n".join([
        "buf0 = torch.ops.mkldnn._convolution_pointwise.default(arg0_1, w, b, [0, 0])",
        "torch.ops.mkldnn._convolution_pointwise_.binary(buf2, buf0, w2, b2, [1, 1])",
        "buf3 = extern_kernels.addmm(b3, buf2, w3)",
        "buf4 = torch.ops.onednn.qconv_pointwise.default(buf3, 0.1, 3, w4)",
        "    # torch.ops.onednn.qlinear_pointwise.default(buf4) (a comment)",
    ])
    k = count_kernels(code, 4)
    assert (k.int8, k.float, k.kernels) == (1, 3, {"qconv_pointwise": 1}) and not k.all_int8
