"""Capture: tracing, BatchNorm folding, where the quantizers go, skip patterns, the fallback for
models ``torch.fx`` cannot trace."""

from __future__ import annotations

import math
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import ptqkit
from ptqkit import PTQConfig, PTQWarning
from ptqkit.capture import fold_batchnorms, fold_bn_into, trace
from ptqkit.quant.modules import ActQuant, QuantLayer, act_quants, float_mode, quant_layers

CFG = PTQConfig(progress=False)


def _data(shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _is_aq(gm: nn.Module, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), ActQuant)


def _node(gm: fx.GraphModule, target: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.target == target)


def _random_bn(c: int, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) * 2 - 0.5)  # some negative gammas
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.1)
    return bn.eval()


# -- BatchNorm folding ---------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 4])
def test_fold_bn_into_is_exact(bias, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=groups, bias=bias).eval()
    bn = _random_bn(12)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        want = bn(conv(x))
        fold_bn_into(conv, bn)
        got = conv(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fold_bn_into_linear_with_non_affine_bn():
    torch.manual_seed(0)
    lin = nn.Linear(5, 7).eval()
    bn = nn.BatchNorm1d(7, affine=False).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 5)
    with torch.no_grad():
        want = bn(lin(x))
        fold_bn_into(lin, bn)
        torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)


def test_fold_batchnorms_in_a_traced_model_preserves_outputs(digits_cnn, digits_data):
    x = digits_data[2][:64]
    gm, reason = trace(digits_cnn)
    assert reason == ""
    for i, name in enumerate(["bn1", "bn2", "bn3"]):  # non-trivial statistics
        setattr(gm, name, _random_bn(getattr(gm, name).num_features, seed=i))
    with torch.no_grad():
        want = gm(x)
        assert fold_batchnorms(gm) == ["bn1", "bn2", "bn3"]
        got = gm(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_quantized_model_in_float_mode_is_the_folded_float_model(digits_cnn, digits_data):
    x = digits_data[2]
    q = ptqkit.quantize(digits_cnn, [x[:128]], CFG)
    assert q.ptq_info.traced and q.ptq_info.folded_bn == ["bn1", "bn2", "bn3"]
    with torch.no_grad(), float_mode(q):
        got = q(x)
    torch.testing.assert_close(got, digits_cnn(x), rtol=1e-4, atol=1e-4)


def test_bn_shared_or_not_after_a_layer_is_left_alone():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv output has two users: folding would be wrong

    m = M().eval()
    gm, _ = trace(m)
    assert fold_batchnorms(gm) == []
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(gm(x), m(x))


# -- placement -----------------------------------------------------------------------------------
def test_relu_output_is_quantized_after_the_relu_not_before(quantized_digits):
    gm = quantized_digits
    for relu in ("relu1", "relu2", "relu3"):
        node = _node(gm, relu)
        producer = node.args[0]
        assert not _is_aq(gm, producer), f"a quantizer sits between {producer} and {relu}"
        (user,) = node.users
        assert _is_aq(gm, user), f"the output of {relu} is not quantized"
        lo, hi = gm.get_submodule(user.target).range.tolist()
        assert lo == 0.0 and hi > 0.0  # calibrated on the ReLU's output


class ConvReLU6Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU6()
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.act1(self.bn1(self.conv1(x))))


def test_relu6_output_is_quantized_after_the_relu6():
    m = ConvReLU6Net().eval()
    data = [3 * x for x in _data((32, 3, 6, 6))]  # conv outputs exceed 6: ReLU6 clips them
    q = ptqkit.quantize(m, data, CFG)
    node = _node(q, "act1")
    assert node.args[0].target == "conv1"  # BN folded, no quantizer in between
    (user,) = node.users
    assert _is_aq(q, user) and "after act1" in q.get_submodule(user.target).label
    lo, hi = q.get_submodule(user.target).range.tolist()
    assert lo == 0.0 and 0.0 < hi <= 6.0
    with torch.no_grad():
        assert ptqkit.quant.sqnr_db(m(data[0]), q(data[0])) > 25


def test_residual_add_inputs_and_output_are_quantized(quantized_digits):
    gm = quantized_digits
    add = next(n for n in gm.graph.nodes if n.target in (operator.add, torch.add))
    assert all(_is_aq(gm, a) for a in add.args), "each input of the add is on a grid"
    assert len({a.target for a in add.args}) == 2, "each input has its own quantizer"
    (relu,) = add.users  # the add's output is quantized after the ReLU that follows it
    (user,) = relu.users
    assert _is_aq(gm, user)
    assert gm.get_submodule(user.target).label == "output of add after relu2"


def test_add_without_activation_and_cat_get_their_own_output_quantizer():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.c = nn.Linear(12, 2)

        def forward(self, x):
            s = self.a(x) + self.b(x)
            return self.c(torch.cat([s, self.a(x) * 2, x], dim=1))

    q = ptqkit.quantize(M().eval(), _data((32, 4)), CFG)
    labels = set(q.ptq_info.quantizers.values())
    assert "output of add" in labels and "output of cat" in labels
    add = next(n for n in q.graph.nodes if n.target is operator.add)
    assert all(_is_aq(q, a) for a in add.args)
    cat = next(n for n in q.graph.nodes if n.target is torch.cat)
    assert all(_is_aq(q, a) for a in cat.args[0])


def test_value_preserving_ops_keep_their_input_grid():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.relu = nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.fc = nn.Linear(4 * 2 * 2, 3)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))

    q = ptqkit.quantize(M().eval(), _data((32, 3, 6, 6)), CFG)
    # input, output of the conv after the ReLU; max-pool and flatten keep that grid
    assert sorted(q.ptq_info.quantizers.values()) == [
        "input of conv (x)",
        "output of conv after relu",
    ]


class SamePadConv2d(nn.Conv2d):
    """A "same padding" conv as in EfficientNet ports: zero-pads first, then convolves unpadded
    (asymmetric padding when the stride is 2)."""

    def __init__(self, cin, cout, k, stride=1, image_size=8):
        super().__init__(cin, cout, k, stride=stride, padding=0)
        total = max((math.ceil(image_size / stride) - 1) * stride + k - image_size, 0)
        self.static_padding = nn.ZeroPad2d((total // 2, total - total // 2) * 2)

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride)


@pytest.mark.parametrize("stride", [1, 2])
def test_same_padding_conv_subclass_keeps_its_padding(stride):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = SamePadConv2d(3, 6, 3, stride)
            self.act = nn.ReLU6()
            self.head = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.head(self.act(self.conv(x)))

    m = M().eval()
    data = _data((32, 3, 8, 8))
    q = ptqkit.quantize(m, data, CFG)
    layer = q.get_submodule("conv")
    assert isinstance(layer, QuantLayer) and isinstance(layer.layer, SamePadConv2d)
    assert isinstance(layer.layer.static_padding, nn.ZeroPad2d)
    with torch.no_grad():
        want, got = m(data[0]), q(data[0])
    side = 8 // stride  # "same": ceil(8 / stride)
    assert got.shape == want.shape == (32, 2, side, side)
    assert ptqkit.quant.sqnr_db(want, got) > 25


def test_grouped_depthwise_conv1d_and_linear_are_all_quantized():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv1d(4, 8, 1)
            self.dw = nn.Conv1d(8, 8, 3, padding=1, groups=8)
            self.gc = nn.Conv1d(8, 8, 3, padding=1, groups=2)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            y = self.gc(F.relu(self.dw(F.relu(self.pw(x)))))
            return self.fc(y.mean(-1))

    m = M().eval()
    data = _data((32, 4, 10))
    q = ptqkit.quantize(m, data, CFG)
    assert sorted(quant_layers(q)) == ["dw", "fc", "gc", "pw"]
    for layer in quant_layers(q).values():
        assert layer.weight_int.dtype == torch.int8
        assert layer.weight_scale.shape == (layer.weight_fp.shape[0],)
    with torch.no_grad():
        assert ptqkit.quant.sqnr_db(m(data[0]), q(data[0])) > 25


def test_number_flowing_into_a_quantized_mul_passes_through():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, scale=2.0):
            return self.fc(x) * scale  # fx sees `scale` as a node, as it would an activation

    torch.manual_seed(0)
    m = M().eval()
    data = _data((32, 4))
    with pytest.warns(PTQWarning, match=r"input of mul \(scale\): no calibration data"):
        q = ptqkit.quantize(m, [{"x": x} for x in data], CFG)
    x = data[0]
    with torch.no_grad():
        assert ptqkit.quant.sqnr_db(m(x, scale=2.0), q(x, scale=2.0)) > 25


# -- skip ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("patterns", "skipped"),
    [(("fc",), ["fc"]), (("Linear",), ["fc"]), (("conv[12]",), ["conv1", "conv2"])],
)
def test_skip_patterns_leave_layers_in_float(digits_cnn, calib_batches, patterns, skipped):
    q = ptqkit.quantize(digits_cnn, calib_batches, CFG.replace(skip=patterns))
    assert q.ptq_info.skipped == skipped
    for name in skipped:
        layer = q.get_submodule(name)
        assert not isinstance(layer, QuantLayer) and isinstance(layer, (nn.Conv2d, nn.Linear))
    assert set(quant_layers(q)) == {"conv1", "conv2", "conv3", "fc"} - set(skipped)


def test_skip_pattern_matching_nothing_warns(digits_cnn, calib_batches):
    with pytest.warns(PTQWarning, match=r"skip pattern 'decoder\.\*' matches no"):
        q = ptqkit.quantize(digits_cnn, calib_batches, CFG.replace(skip=("decoder.*", "fc")))
    assert q.ptq_info.skipped == ["fc"]


# -- untraceable models --------------------------------------------------------------------------
class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.pos = nn.Linear(8, 4)
        self.neg = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3))
        return self.pos(h) if x.mean() > 0 else self.neg(h)


def test_untraceable_model_falls_back_to_input_quantizers_and_says_why():
    m = Branchy().eval()
    data = [x + 0.5 * (-1) ** i for i, x in enumerate(_data((32, 3, 6, 6)))]  # both branches
    with pytest.warns(PTQWarning, match=r"cannot trace Branchy \(TraceError: .*control flow"):
        q = ptqkit.quantize(m, data, CFG)
    info = q.ptq_info
    assert not info.traced and "TraceError" in info.trace_error
    layers = quant_layers(q)
    assert sorted(layers) == ["conv", "neg", "pos"]
    for name, layer in layers.items():
        assert layer.quantized and layer.weight_int.dtype == torch.int8
        assert isinstance(layer.input_quant, ActQuant), name
        assert layer.input_quant.calibrated and layer.input_quant.mode == "quant"
    assert sorted(act_quants(q)) == ["conv.input_quant", "neg.input_quant", "pos.input_quant"]
    with torch.no_grad():
        for x in data[:2]:
            assert ptqkit.quant.sqnr_db(m(x), q(x)) > 25


def test_trace_reports_the_reason_without_raising():
    gm, reason = trace(Branchy())
    assert gm is None and reason.startswith("TraceError")


def test_quantizing_twice_gives_the_same_model(calib_batches, digits_cnn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean run warns about nothing
        q1 = ptqkit.quantize(digits_cnn, calib_batches, CFG)
        q2 = ptqkit.quantize(digits_cnn, calib_batches, CFG)
    s1, s2 = q1.state_dict(), q2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
