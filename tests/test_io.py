"""``ptqkit.save`` / ``ptqkit.load``: one safetensors file, bit-identical round trip, atomic
writes, clear errors for bad files and mismatched architectures, never a pickle."""

from __future__ import annotations

import copy
import json
import os
import pickle
import struct
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import ptqkit
from ptqkit import LoadError, ModelError, PTQConfig, QuantSpec
from ptqkit.quant.modules import act_quants, quant_layers
from ptqkit.zoo.models import DigitsCNN

CFG = PTQConfig(calibration="minmax", bias_correction=False, progress=False)


def _same_model(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(a(x), b(x)), "outputs differ"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    for (na, qa), (nb, qb) in zip(act_quants(a).items(), act_quants(b).items()):
        assert (na, qa.label, qa.mode, qa.spec) == (nb, qb.label, qb.mode, qb.spec)
    for (na, la), (nb, lb) in zip(quant_layers(a).items(), quant_layers(b).items()):
        assert (na, la.quantized, la.spec) == (nb, lb.quantized, lb.spec)
        assert torch.equal(la.weight, lb.weight)


@pytest.fixture
def saved(quantized_digits, tmp_path):
    path = tmp_path / "digits.int8.safetensors"
    ptqkit.save(quantized_digits, path)
    return path


def test_round_trip_is_bit_identical(quantized_digits, saved, digits_data):
    fresh = DigitsCNN()  # untrained: every weight comes from the file
    before = copy.deepcopy(fresh.state_dict())
    loaded = ptqkit.load(saved, fresh)
    _same_model(quantized_digits, loaded, digits_data[2])
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert loaded.ptq_config == quantized_digits.ptq_config
    info, orig = loaded.ptq_info, quantized_digits.ptq_info
    assert (info.layers, info.quantizers, info.calibration_samples, info.folded_bn) == (
        orig.layers,
        orig.quantizers,
        orig.calibration_samples,
        orig.folded_bn,
    )


def test_file_holds_integers_scales_ranges_and_metadata(saved, quantized_digits):
    with open(saved, "rb") as f:  # safetensors: an 8-byte header length, then a JSON header
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    assert header["conv1.weight_int"]["dtype"] == "I8"
    assert header["conv1.weight_scale"]["dtype"] == "F32"
    assert header["aq_relu1.range"]["shape"] == [2]
    with safe_open(str(saved), framework="pt") as f:
        floats = {f"__float_weight__.{n}" for n in quant_layers(quantized_digits)}
        # bias correction (on by default): the corrected and the float bias of each layer
        biases = {
            f"__{b}__.{n}"
            for n, q in quant_layers(quantized_digits).items()
            for b in ("bias_q", "bias_fp")
            if getattr(q, b, None) is not None
        }
        assert biases, "the default config corrects the biases"
        assert set(f.keys()) == set(quantized_digits.state_dict()) | floats | biases
        assert torch.equal(f.get_tensor("__bias_q__.fc"), quantized_digits.fc.bias_q)
        assert torch.equal(f.get_tensor("__float_weight__.fc"), quantized_digits.fc.weight_fp)
        (doc,) = f.metadata().values()
    doc = json.loads(doc)
    assert doc["format"] == "ptqkit.quantized" and doc["format_version"] == 2
    assert doc["ptqkit_version"] == ptqkit.__version__
    assert PTQConfig.from_dict(doc["config"]) == quantized_digits.ptq_config
    assert doc["quantizers"]["aq_relu1"]["label"] == "output of conv1 after relu1"
    assert doc["layers"]["fc"] == {"quantized": True, "spec": quantized_digits.fc.spec.to_dict()}
    assert doc["info"]["calibration_samples"] == 256


def test_save_overwrites_atomically_and_leaves_no_temp_file(quantized_digits, saved):
    first = saved.read_bytes()
    ptqkit.save(quantized_digits, saved)
    assert saved.read_bytes() == first  # deterministic
    assert os.listdir(saved.parent) == [saved.name]


def test_failed_save_keeps_the_old_file(quantized_digits, saved, monkeypatch):
    import ptqkit.io.files

    first = saved.read_bytes()

    def crash(src, dst):  # the temporary file is written, the rename fails
        raise OSError("disk full")

    monkeypatch.setattr(ptqkit.io.files.os, "replace", crash)
    with pytest.raises(ptqkit.SaveError, match=rf"cannot write {saved}: disk full"):
        ptqkit.save(quantized_digits, saved)
    assert saved.read_bytes() == first
    assert os.listdir(saved.parent) == [saved.name]


def test_load_never_unpickles(saved, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    ptqkit.load(saved, DigitsCNN())


@pytest.mark.parametrize(
    "cfg",
    [
        CFG.replace(weights=QuantSpec(bits=4, per_channel=True)),
        CFG.replace(
            weights=QuantSpec(bits=8, per_channel=False),
            activations=QuantSpec(bits=8, symmetric=True),
            calibration="percentile",
        ),
        CFG.replace(weights=QuantSpec(bits=12, symmetric=False, per_channel=True)),
        CFG.replace(activations=None, skip=("fc",)),
    ],
    ids=["w4", "per-tensor-percentile", "w12-asym", "weights-only-skip"],
)
def test_round_trip_of_other_configs(digits_cnn, calib_batches, digits_data, tmp_path, cfg):
    q = ptqkit.quantize(digits_cnn, calib_batches, cfg)
    ptqkit.save(q, tmp_path / "q.safetensors")
    _same_model(q, ptqkit.load(tmp_path / "q.safetensors", DigitsCNN()), digits_data[2])


def test_round_trip_of_layers_kept_in_float_and_disabled_quantizers(
    quantized_digits, digits_data, tmp_path
):
    q = copy.deepcopy(quantized_digits)  # as the accuracy fallback leaves a model
    layer = q.get_submodule("conv2")
    layer.set_float_weight(layer.weight_fp * 1.01)  # a float weight prepare cannot recreate
    q.aq_relu3.mode = "off"
    ptqkit.save(q, tmp_path / "q.safetensors")
    loaded = ptqkit.load(tmp_path / "q.safetensors", DigitsCNN())
    assert not loaded.conv2.quantized and loaded.aq_relu3.mode == "off"
    _same_model(q, loaded, digits_data[2])


def test_round_trip_of_an_untraceable_model(tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h) if h.sum() > 0 else -self.b(h)

    torch.manual_seed(0)
    m = Branchy().eval()
    data = [torch.randn(64, 6) for _ in range(3)]
    with pytest.warns(ptqkit.PTQWarning, match="cannot trace|captured with hooks"):
        q = ptqkit.quantize(m, data, CFG)
    ptqkit.save(q, tmp_path / "q.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading repeats no warning of the quantize run
        loaded = ptqkit.load(tmp_path / "q.safetensors", Branchy())
    _same_model(q, loaded, data[0])


# -- structure added after prepare (CLE clamps, SmoothQuant quantizers) ---------------------------
class ReLU6Net(nn.Module):
    """conv-BN-ReLU6-depthwise-ReLU6-conv: CLE turns each ReLU6 into a per-channel clamp."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a1, self.dw, self.a2 = nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6()
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(self.a2(self.dw(self.a1(self.bn(self.c1(x))))))


class PostLN(nn.Module):
    """The LayerNorm output feeds the Linear and the residual add: SmoothQuant cannot fold its
    scale into the LayerNorm and gives the Linear its own smoothing quantizer in the graph."""

    def __init__(self):
        super().__init__()
        self.ln, self.a, self.b = nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.ln(x)
        return self.b(h + self.a(h))


class BranchyLN(PostLN):
    def forward(self, x):
        h = self.ln(x)
        return self.b(h + self.a(h)) if x.sum() > 0 else self.b(h)


def _quantize_quietly(model, data, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ptqkit.quantize(model, data, cfg)


def test_round_trip_after_cle_rewired_the_graph(tmp_path):
    torch.manual_seed(0)
    m = ReLU6Net().eval()
    m.bn.running_mean.normal_()
    m.bn.running_var.uniform_(0.5, 2.0)
    m.bn.weight.data.uniform_(0.1, 3.0)
    data = [torch.randn(32, 3, 8, 8) for _ in range(4)]
    q = _quantize_quietly(m, data, CFG.replace(cle=True))
    clamps = [n for n, mod in q.named_modules() if type(mod).__name__ == "ChannelClamp"]
    assert clamps, "CLE should have replaced the ReLU6s by per-channel clamps"
    ptqkit.save(q, tmp_path / "q.safetensors")
    for arch in (copy.deepcopy(m), ReLU6Net()):  # the trained model, or a fresh instance
        _same_model(q, ptqkit.load(tmp_path / "q.safetensors", arch), data[0])


@pytest.mark.parametrize("arch", [PostLN, BranchyLN], ids=["traced", "untraceable"])
def test_round_trip_after_smoothquant_replaced_quantizers(tmp_path, arch):
    torch.manual_seed(0)
    m = arch().eval()
    data = [torch.randn(32, 16) * torch.linspace(0.1, 10, 16) + 1 for _ in range(4)]
    q = _quantize_quietly(m, data, CFG.replace(smoothquant=0.5))
    assert any(type(mod).__name__ == "SmoothedActQuant" for mod in q.modules())
    ptqkit.save(q, tmp_path / "q.safetensors")
    _same_model(q, ptqkit.load(tmp_path / "q.safetensors", arch()), data[0])


def _resigned(src, dst, edit_doc=None, edit_tensors=None):
    """``src`` edited, then written with a valid digest (as an editor who knows the format
    would): what is left to catch an edit is load's validation."""
    from pathlib import Path

    from ptqkit.io.container import read, write

    tensors, doc = read(Path(src))
    if edit_doc:
        edit_doc(doc)
    if edit_tensors:
        edit_tensors(tensors)
    write(Path(dst), tensors, doc)
    return dst


def test_a_file_cannot_name_a_function_to_call(saved, tmp_path):
    def edit(doc):
        node = next(n for n in doc["graph"] if n["op"] == "call_function")
        node["target"] = "posix.system"
        doc["graph"].insert(0, doc["graph"].pop(doc["graph"].index(node)))

    _resigned(saved, tmp_path / "evil.safetensors", edit)
    _expect_load_error(tmp_path / "evil.safetensors", r"posix\.system")


# -- bad files -----------------------------------------------------------------------------------
def _expect_load_error(path, match, model=None):
    with pytest.raises(LoadError, match=match):
        ptqkit.load(path, model if model is not None else DigitsCNN())


@pytest.mark.parametrize("keep", [0, 5, 100, 0.5, -3])
def test_truncated_file_is_a_load_error(saved, keep):
    raw = saved.read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else keep if keep >= 0 else len(raw) + keep
    saved.write_bytes(raw[:n])
    _expect_load_error(saved, "truncated, corrupt or another format|checksum")


def test_flipped_byte_in_tensor_data_is_a_load_error(saved):
    raw = bytearray(saved.read_bytes())
    raw[-20] ^= 0xFF
    saved.write_bytes(bytes(raw))
    _expect_load_error(saved, "checksum")


def test_foreign_files_are_load_errors(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    _expect_load_error(plain, "not a ptqkit quantized model")
    pickled = tmp_path / "model.pt"
    torch.save(DigitsCNN().state_dict(), pickled)
    _expect_load_error(pickled, "not a readable ptqkit file")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    _expect_load_error(text, "not a readable ptqkit file")
    _expect_load_error(tmp_path / "missing.safetensors", "no such file")


def test_newer_format_version_is_a_load_error(saved, tmp_path):
    with safe_open(str(saved), framework="pt") as f:
        doc = json.loads(f.metadata()["ptqkit"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    doc["format_version"] = 99
    save_file(tensors, str(tmp_path / "v99.safetensors"), metadata={"ptqkit": json.dumps(doc)})
    _expect_load_error(tmp_path / "v99.safetensors", "format version 99 is newer")
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"ptqkit": "{oops"})
    _expect_load_error(tmp_path / "bad.safetensors", "not valid JSON")


def test_other_architecture_is_a_load_error(saved):
    from ptqkit.zoo.models import ResNetFM

    _expect_load_error(saved, r"quantized layers in the file but not in the model", ResNetFM())


def test_layer_of_another_shape_is_a_load_error(saved):
    class Wider(DigitsCNN):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 5)

    _expect_load_error(saved, r"fc\b.* has shape \(10(, 32)?,?\) in the file but \(5", Wider())


def test_architecture_with_an_extra_layer_is_a_load_error(saved):
    class Extra(DigitsCNN):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(10, 10)

        def forward(self, x):
            return self.head(super().forward(x))

    _expect_load_error(saved, r"in the model but not in the file: \['head'\]", Extra())


def test_saving_a_float_model_is_a_model_error(digits_cnn, tmp_path):
    with pytest.raises(ModelError, match=r"model returned by ptqkit\.quantize"):
        ptqkit.save(digits_cnn, tmp_path / "x.safetensors")
    assert not os.listdir(tmp_path)
