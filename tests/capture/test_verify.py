"""The equivalence check of the capture, in-place ops, stateful forwards, refused models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptqkit
from ptqkit import ModelError, PTQConfig, PTQWarning
from ptqkit.capture.verify import first_batch, output_error
from ptqkit.quant import sqnr_db

CFG = PTQConfig(progress=False)


def _data(shape, n=6, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=g) * scale + offset for _ in range(n)]


def _sqnr(m, q, x):
    with torch.no_grad():
        return sqnr_db(m(x.clone()), q(x.clone()))


# -- the check itself ----------------------------------------------------------------------------
def test_output_error_is_relative_to_the_largest_reference_value_and_handles_nesting():
    b = {"a": torch.tensor([1.0, -4.0]), "b": (torch.tensor([2.0]), 3)}
    a = {"a": torch.tensor([1.0, -4.002]), "b": (torch.tensor([2.0]), 3)}
    err, where, tol = output_error(a, b)
    assert err == pytest.approx(0.002 / 4, rel=1e-3) and where == "output['a']" and tol == 1e-4
    assert output_error(b, b)[0] == 0.0
    assert output_error({"a": b["a"], "b": (torch.tensor([2.0]), 4)}, b)[0] == float("inf")
    assert output_error({"a": b["a"]}, b)[0] == float("inf")  # structure differs


def test_first_batch_puts_the_batch_back_in_a_one_shot_iterator():
    data = [torch.ones(2), torch.zeros(2)]
    first, again = first_batch(iter(data))
    assert torch.equal(first, data[0]) and [t.sum().item() for t in again] == [2.0, 0.0]
    first, same = first_batch(data)
    assert same is data and torch.equal(first, data[0])


def test_capture_records_method_attempts_and_error(digits_cnn, calib_batches):
    q = ptqkit.quantize(digits_cnn, calib_batches, CFG.replace(cle=True))
    info = q.ptq_info
    assert info.capture == "fx" and info.capture_attempts == ["fx: used"]
    assert 0.0 < info.capture_error < 1e-4  # BN folding moves the last bits only
    assert set(info.capture_checks) == {"capture", "CLE"}
    assert all(e < 1e-4 for e in info.capture_checks.values())
    assert "verify" in info.stages


class _TraceAware(nn.Module):
    """Behaves differently while torch.fx traces it, as some libraries do: the trace is wrong."""

    def forward(self, x):
        if torch.fx._symbolic_trace.is_fx_tracing():
            return x
        return 2 * x


class FxDiverges(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.odd = _TraceAware()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.odd(self.conv(x))).mean((2, 3)))


def test_a_trace_computing_something_else_falls_back_to_hooks():
    torch.manual_seed(0)
    m = FxDiverges().eval()
    data = _data((16, 3, 6, 6))
    with pytest.warns(PTQWarning, match=r"captured with hooks \(fx: output differs .* error of"):
        q = ptqkit.quantize(m, data, CFG)
    info = q.ptq_info
    assert info.capture == "hooks" and info.capture_attempts[-1] == "hooks: used"
    assert info.capture_error == 0.0
    assert _sqnr(m, q, data[0]) > 30


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) + torch.rand_like(x)  # not a function of its input


def test_no_capture_reproducing_the_model_is_a_model_error():
    with pytest.raises(ModelError, match=r"no capture method reproduces Noisy.*fx: .*hooks: "):
        ptqkit.quantize(Noisy().eval(), _data((8, 4)), CFG)


# -- state changed in forward --------------------------------------------------------------------
class Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)
        self.calls = 0
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        h = F.relu(self.conv(x)).mean((2, 3))
        self.cache = h
        self.seen += x.shape[0]
        return self.fc(h)


def test_a_forward_that_changes_state_is_captured_with_hooks_and_the_user_model_is_untouched():
    torch.manual_seed(0)
    m = Stateful().eval()
    before = copy.deepcopy(m.state_dict())
    data = _data((16, 3, 6, 6))
    with pytest.warns(PTQWarning, match=r"forward changes its state \(calls, cache, seen\)"):
        q = ptqkit.quantize(m, data, CFG)
    assert m.calls == 0 and not hasattr(m, "cache") and torch.equal(m.seen, before["seen"])
    assert q.ptq_info.capture == "hooks"
    n = q.calls
    assert _sqnr(m, q, data[0]) > 30 and q.calls == n + 1  # the copy keeps the user's forward


# -- in-place ops --------------------------------------------------------------------------------
class InplaceNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = x.clone()
        x.div_(255).sub_(0.5)
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class InplaceScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x.mul_(0.01)
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class InplaceResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        out = self.c2(self.act(self.c1(x)))
        out.add_(x)
        out.relu_()
        F.relu(out, inplace=True)
        return self.fc(out.mean((2, 3)))


@pytest.mark.parametrize(
    ("cls", "shape", "scale"),
    [(InplaceNorm, (16, 3, 8, 8), 255.0), (InplaceScale, (16, 3, 8, 8), 100.0),
     (InplaceResidual, (16, 8, 8, 8), 1.0)],
)
def test_in_place_ops_keep_their_function(cls, shape, scale):
    torch.manual_seed(0)
    m = cls().eval()
    data = _data(shape, scale=scale)
    q = ptqkit.quantize(m, [d.clone() for d in data], CFG)
    assert q.ptq_info.capture == "fx"
    x = _data(shape, n=1, seed=1, scale=scale)[0]
    assert _sqnr(m, q, x) >= 30
    x2 = x.clone()
    with torch.no_grad():
        q(x2)
    assert torch.equal(x2, x)  # the copy no longer writes into the caller's tensor


def test_in_place_residual_is_quantized_after_the_add_and_relu():
    torch.manual_seed(0)
    q = ptqkit.quantize(InplaceResidual().eval(), _data((16, 8, 8, 8)), CFG)
    labels = set(q.ptq_info.quantizers.values())
    assert any(lbl.startswith("output of add") for lbl in labels), labels


# -- refused models ------------------------------------------------------------------------------
def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2)).eval()


def test_torchscript_model_is_a_model_error_naming_what_to_pass():
    x = torch.randn(2, 3, 4, 4)
    for scripted in (torch.jit.script(_small()), torch.jit.trace(_small(), x)):
        with pytest.raises(ModelError, match=r"TorchScript module .* pass the original nn.Module"):
            ptqkit.quantize(scripted, [x], CFG)


def test_meta_device_model_is_a_model_error():
    with torch.device("meta"):
        m = _small()
    with pytest.raises(ModelError, match=r"0.weight is on the 'meta' device.*to_empty"):
        ptqkit.quantize(m, [torch.randn(2, 3, 4, 4)], CFG)


def test_already_quantized_model_is_a_model_error():
    data = [torch.randn(8, 3, 4, 4) for _ in range(2)]
    q = ptqkit.quantize(_small(), data, CFG)
    with pytest.raises(ModelError, match=r"already quantized .* pass the float model"):
        ptqkit.quantize(q, data, CFG)


def test_a_hook_capture_chosen_for_state_loads_with_hooks(tmp_path):
    """The file names the capture used, so ``load`` does not trace a model whose forward
    changes its state (fx would, and the quantizers would differ)."""
    torch.manual_seed(0)
    m, data = Stateful().eval(), _data((16, 3, 6, 6))
    with pytest.warns(PTQWarning):
        q = ptqkit.quantize(m, data, CFG)
    ptqkit.save(q, tmp_path / "stateful.safetensors")
    loaded = ptqkit.load(tmp_path / "stateful.safetensors", Stateful().eval())
    assert loaded.ptq_info.capture == "hooks"
    with torch.no_grad():
        assert torch.equal(loaded(data[0]), q(data[0]))


# -- the layout of the check and of the calibration pass ---------------------------------------
class ConvNet(nn.Module):
    def __init__(self, flatten_by_view: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        self.view = flatten_by_view

    def forward(self, x):
        y = F.relu(self.conv(x))
        # .view needs the default layout: fails on a channels-last conv output
        return self.fc(y.view(y.shape[0], -1) if self.view else y.flatten(1))


@pytest.mark.parametrize("by_view", [False, True])
def test_channels_last_calibration_only_where_the_check_passed_that_way(by_view):
    """A graph capture is checked with channels-last inputs and calibrates that way; one whose
    graph cannot run them (a .view) is checked again in the default layout and calibrates in
    it, with the same capture; both match the float model."""
    torch.manual_seed(0)
    m = ConvNet(by_view).eval()
    data = _data((8, 3, 6, 6))
    q = ptqkit.quantize(m, data, CFG.replace(bias_correction=False))
    info = q.ptq_info
    assert info.capture == "fx" and info.details["channels_last"] is (not by_view)
    assert info.capture_error <= 1e-4
    assert _sqnr(m, q, data[0]) > 25


@pytest.mark.parametrize("by_view", [False, True])
def test_the_layout_flows_on_the_context_not_through_the_record(by_view):
    """The capture stage puts the layout its check passed in on ``Context.channels_last``
    (from :class:`ptqkit.capture.prepare.Capture`) and records it; the calibration pass feeds
    the copy in that layout, whatever the record says: a record edited to the other layout
    changes nothing."""
    from ptqkit.info import PTQInfo
    from ptqkit.stage import Context
    from ptqkit.technique import run_stages
    from ptqkit.techniques import technique

    torch.manual_seed(0)
    m = ConvNet(by_view).eval()
    data = _data((8, 3, 6, 6))
    cfg = CFG.replace(bias_correction=False)
    ctx = Context(model=m, data=data, config=cfg, info=PTQInfo(config=cfg.to_dict()))
    run_stages([technique("capture")], ctx)
    assert ctx.channels_last is (not by_view)
    assert ctx.info.details["channels_last"] is ctx.channels_last
    ctx.info.details["channels_last"] = by_view  # a record is not an input
    seen: list[bool] = []
    conv = ctx.qmodel.get_submodule("conv")
    hook = conv.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    run_stages([technique("calibrate")], ctx)
    hook.remove()
    assert len(seen) == len(data)
    assert all(s is ctx.channels_last for s in seen)
