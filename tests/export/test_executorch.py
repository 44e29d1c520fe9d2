"""ExecuTorch / XNNPACK: the program's Q/DQ follow the pattern XNNPACKQuantizer emits (checked
without executorch), the rewrites are exact, and, where executorch is installed, the lowered
``.pte`` runs on XNNPACK's qs8 kernels, agrees with the simulation, saves and loads back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _backends import BranchNet, needs, without
from torch import nn

import ptqkit
from ptqkit.errors import ExportError, LoadError
from ptqkit.export.executorch import PIP, export_pte, load_pte, one_dq_per_user
from ptqkit.export.pt2 import export_pt2, program_report
from ptqkit.export.xnnpack import xnnpack_program, xnnpack_violations
from ptqkit.quant.primitives import sqnr_db

CFG = ptqkit.PTQConfig(progress=False)
needs_et = needs("executorch", PIP)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return BranchNet().eval()


@pytest.fixture(scope="module")
def qnet(net, calib_batches) -> nn.Module:
    return ptqkit.quantize(net, calib_batches, CFG)


@pytest.fixture(scope="module")
def programs(qnet, digits_data):
    prog = export_pt2(qnet, digits_data[2][:1])
    return prog, *xnnpack_program(prog)


def test_rewrite_matches_xnnpack_pattern_and_is_exact(programs, digits_data) -> None:
    prog, xprog, floated = programs
    # ptqkit's default asymmetric activations are uint8: XNNPACK's partitioner takes none
    assert any("torch.uint8" in v for v in xnnpack_violations(prog))
    assert xnnpack_violations(xprog) == []
    x = digits_data[2][:7]  # a batch other than the traced one: the batch stays dynamic
    with torch.no_grad():
        assert torch.equal(xprog.module()(x), prog.module()(x))
    # the logits' Linear is the one layer whose output stays float: float weight, counted
    rep, xrep = program_report(prog), program_report(xprog)
    assert rep.int8_layers == len(rep.layers) == 6
    assert floated == ["linear"] and xrep.float_layers == ("linear",)
    assert xrep.int8_layers == 5


def test_violations_name_each_departure(programs) -> None:
    prog, xprog, _ = programs
    lines = xnnpack_violations(prog)
    assert any("conv2d: input is not DQ per tensor int8" in v for v in lines)
    assert any("linear: int8 weight but float output" in v for v in lines)
    assert any("cat: inputs and output on 3 grids" in v for v in lines)  # two branches, one Q
    gm = xprog.module()  # a per-tensor Q/DQ put back to uint8 is named again
    q = next(n for n in gm.graph.nodes if "quantize_per_tensor" in str(n.target))
    q.args = (*q.args[:5], torch.uint8)
    again = torch.export.export(gm, xprog.example_inputs[0], strict=False)
    assert any(f"{q.name}: torch.uint8" in v for v in xnnpack_violations(again))


def test_activation_grids_xnnpack_cannot_run_are_refused(net, calib_batches, digits_data) -> None:
    cfg = ptqkit.PTQConfig(activations=ptqkit.QuantSpec(bits=6, symmetric=False), progress=False)
    prog = export_pt2(ptqkit.quantize(net, calib_batches, cfg), digits_data[2][:1])
    with pytest.raises(ExportError, match=r"\[0, 63\] activation grid.*8-bit"):
        xnnpack_program(prog)


def test_missing_executorch_names_the_pip_package(qnet, digits_data, monkeypatch) -> None:
    without(monkeypatch, "executorch")
    with pytest.raises(ExportError, match=r"pip install 'ptqkit\[executorch\]'"):
        export_pte(qnet, digits_data[2][:1])
    with pytest.raises(LoadError, match=r"pip install 'ptqkit\[executorch\]'"):
        load_pte("model.pte")


def _layer_pattern(program: torch.export.ExportedProgram) -> list[tuple]:
    """Per conv/linear (graph order): input DQ dtype, weight DQ op/axis/dtype, output Q'd."""
    from ptqkit.export.xnnpack import _name, _qdq_args, _quantized_output

    out = []
    for n in program.graph.nodes:
        if _name(n) in ("conv2d", "linear"):
            x, w = n.args[0], n.args[1]
            wdq = _name(w).startswith("dequantize")
            out.append(
                (
                    _name(n),
                    _name(x),
                    _qdq_args(x)[2] if _name(x).startswith("dequantize") else None,
                    (_name(w), w.args[3], w.args[-1]) if wdq else "float",
                    _quantized_output(n),
                )
            )
    return out


@needs_et
def test_same_layer_pattern_as_xnnpack_quantizer(net, calib_batches, programs) -> None:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    ex = (calib_batches[0][:2],)
    gm = torch.export.export(net, ex).module()
    config = get_symmetric_quantization_config(is_per_channel=True)
    quantizer = XNNPACKQuantizer().set_global(config)
    prepared = prepare_pt2e(gm, quantizer)
    for b in calib_batches:
        prepared(b)
    theirs = _layer_pattern(torch.export.export(convert_pt2e(prepared), ex))
    ours = _layer_pattern(programs[1])
    assert len(ours) == len(theirs) == 6
    # every conv: DQ int8 input, per-channel int8 weight on axis 0, quantized output — as theirs
    assert ours[:5] == theirs[:5]
    assert all(p[2] == torch.int8 and p[3][1:] == (0, torch.int8) and p[4] for p in ours[:5])
    # the logits: they quantize them (an int8 Linear, an extra rounding of the output); ptqkit
    # keeps them float as the simulation does, so its Linear runs an exact fp32 kernel
    assert theirs[5][3][0] == "dequantize_per_channel" and theirs[5][4]
    assert ours[5][3] == "float" and not ours[5][4]


@needs_et
def test_pte_runs_on_xnnpack_and_agrees_with_simulation(qnet, digits_data, tmp_path) -> None:
    path = tmp_path / "net.pte"
    pte = export_pte(qnet, digits_data[2][:1], path, dynamic_batch=True)
    d = pte.delegation
    assert d is not None and d.layers == 6
    assert (d.int8_layers, d.float_layers, d.outside_layers) == (5, 1, 0), d.summary()
    assert d.delegated_nodes > 0 and d.partitions >= 1
    for n in (1, 7):
        x = digits_data[2][:n]
        with torch.no_grad():
            ref, got = qnet(x), pte(x)
        assert got.shape == ref.shape
        assert sqnr_db(ref, got) > 20.0
    loaded = load_pte(path)
    x = digits_data[2][:7]
    assert torch.equal(loaded(x), pte(x))
    with pytest.raises(ExportError, match=r"the largest this \.pte program"):
        pte(digits_data[2][: pte.max_batch + 1])
    with pytest.raises(LoadError, match="no such file"):
        load_pte(tmp_path / "missing.pte")


class Inverted(nn.Module):
    """Three MobileNet/EfficientNet inverted-residual blocks (1×1 expand-ReLU6, explicit pad,
    depthwise-ReLU6, 1×1 project, residual add) between a stem and a linear head: each block's
    input feeds its expand conv and its add, the shape on which XNNPACK's partitioner found a
    dependency cycle when the two shared one DQ (EfficientNet-Lite0)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem, self.fc = nn.Conv2d(1, c, 3, padding=1), nn.Linear(c, 10)
        self.expand = nn.ModuleList(nn.Conv2d(c, 2 * c, 1) for _ in range(3))
        self.dw = nn.ModuleList(nn.Conv2d(2 * c, 2 * c, 3, groups=2 * c) for _ in range(3))
        self.project = nn.ModuleList(nn.Conv2d(2 * c, c, 1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem(x))
        for e, d, p in zip(self.expand, self.dw, self.project):
            y = F.relu6(d(F.pad(F.relu6(e(x)), (1, 1, 1, 1))))
            x = p(y) + x
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture(scope="module")
def qinverted(calib_batches) -> nn.Module:
    torch.manual_seed(0)
    return ptqkit.quantize(Inverted().eval(), calib_batches, CFG)


def _shared_dqs(program) -> list[str]:
    return [
        n.name
        for n in program.graph.nodes
        if n.op == "call_function" and "dequantize" in str(n.target) and len(n.users) > 1
    ]


def test_one_dq_per_user_is_exact(qinverted, digits_data) -> None:
    xprog, _ = xnnpack_program(export_pt2(qinverted, digits_data[2][:1]))
    x = digits_data[2][:7]
    with torch.no_grad():
        before = xprog.module()(x)
    shared = _shared_dqs(xprog)
    assert len(shared) == 3  # each block's input: its expand conv and its residual add
    assert one_dq_per_user(xprog) == 3
    assert _shared_dqs(xprog) == []
    assert xnnpack_violations(xprog) == []
    with torch.no_grad():
        assert torch.equal(xprog.module()(x), before)
    assert one_dq_per_user(xprog) == 0  # idempotent


@needs_et
def test_inverted_residuals_lower_to_one_xnnpack_partition(qinverted, digits_data) -> None:
    pte = export_pte(qinverted, digits_data[2][:1])
    d = pte.delegation
    assert d is not None and d.partitions == 1, d.summary()
    assert (d.int8_layers, d.float_layers, d.outside_layers) == (10, 1, 0), d.summary()
    x = digits_data[2][:1]
    with torch.no_grad():
        assert sqnr_db(qinverted(x), pte(x)) > 20.0
