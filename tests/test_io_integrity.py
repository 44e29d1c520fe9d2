"""Files that cannot lie: every byte of a saved file is covered (a flipped byte is a LoadError),
every quantization parameter is validated on load (an edited file with a valid digest still fails,
naming the entry), and the float reference is saved (float mode after ``load`` is the float
network that was quantized, with CLE, bias correction and SmoothQuant)."""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path

import pytest
import torch
from test_io import BranchyLN, PostLN  # the same LayerNorm models as the io tests
from torch import nn

import ptqkit
from ptqkit import LoadError, PTQConfig, QuantSpec
from ptqkit.io.container import read, write
from ptqkit.quant.modules import float_mode

CFG = PTQConfig(progress=False)
GEN = torch.Generator().manual_seed(3)
X = torch.randn(64, 6, generator=GEN)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _tiny() -> nn.Module:
    m = Tiny().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return m


def _quantize(model, data, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ptqkit.quantize(model, data, cfg)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """A small file with bias correction (float and corrected biases, a layer without a bias)."""
    q = _quantize(_tiny(), [X[:32], X[32:]], CFG.replace(bias_correction="empirical"))
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    ptqkit.save(q, path)
    return path


# -- every byte ----------------------------------------------------------------------------------
WHAT_FAILED = (
    "not a readable ptqkit file|not in the one form ptqkit writes|checksum|"
    "not a ptqkit quantized model|not valid JSON|format version"
)


def test_every_flipped_byte_is_a_load_error(tiny_file, tmp_path):
    raw = tiny_file.read_bytes()
    (n,) = __import__("struct").unpack("<Q", raw[:8])
    assert len(raw) < 12_000, "keep this file small: every byte is tried"
    target = tmp_path / "flipped.safetensors"
    target.write_bytes(raw)
    arch = Tiny()  # load leaves it unmodified: one instance serves every try
    fd = os.open(target, os.O_RDWR)  # one byte rewritten in place per try: fast
    t0 = time.perf_counter()
    try:
        # every byte with 0xFF; every 7th header byte with 0x01 (keeps ASCII text ASCII and the
        # JSON often valid: the canonical form and the digest must catch those)
        for mask, positions in ((0xFF, range(len(raw))), (0x01, range(0, 8 + n, 7))):
            for i in positions:
                os.pwrite(fd, bytes([raw[i] ^ mask]), i)
                with pytest.raises(LoadError) as e:
                    ptqkit.load(target, arch)
                msg = str(e.value)
                assert str(target) in msg and re.search(WHAT_FAILED, msg), (i, mask, msg)
                os.pwrite(fd, raw[i : i + 1], i)
    finally:
        os.close(fd)
    assert time.perf_counter() - t0 < 60
    target.write_bytes(raw)  # and the unflipped bytes load, bit-identical
    loaded = ptqkit.load(target, Tiny())
    assert torch.equal(loaded(X), ptqkit.load(tiny_file, Tiny())(X))


def test_whitespace_or_key_order_changes_are_load_errors(tiny_file, tmp_path):
    """Edits that keep the JSON meaning but not the canonical form."""
    import json
    import struct

    raw = tiny_file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    for text in (
        json.dumps(header),  # other spacing
        json.dumps(dict(reversed(list(header.items()))), separators=(",", ":")),  # key order
    ):
        head = text.encode() + b" " * (-len(text) % 8)
        out = tmp_path / "respaced.safetensors"
        out.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n :])
        with pytest.raises(LoadError, match="not in the one form ptqkit writes"):
            ptqkit.load(out, Tiny())


# -- validation of each entry (edited files re-signed with a valid digest) -------------------------
def _edit(src: Path, dst: Path, edit_tensors=None, edit_doc=None) -> Path:
    tensors, doc = read(src)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_doc:
        edit_doc(doc)
    write(dst, tensors, doc)
    return dst


def _put(key, value):
    def edit(t):
        k = key
        if key.startswith("AQ."):  # the quantizer after the ReLU (its name is the placement's)
            (aq,) = {n.split(".")[0] for n in t if n.startswith("aq_")} - {"aq_in_x"}
            k = f"{aq}.{key[3:]}"
        assert k in t, k
        t[k] = value(t[k]) if callable(value) else value

    return edit


INVALID = {
    "weight scale 0": (_put("a.weight_scale", lambda s: s * 0), r"a\.weight_scale.*scale 0\.0"),
    "weight scale NaN": (
        _put("a.weight_scale", lambda s: s.index_fill(0, torch.tensor([2]), float("nan"))),
        r"a\.weight_scale.*scale nan is not finite",
    ),
    "weight scale -inf": (
        _put("b.weight_scale", lambda s: -s / 0),
        r"b\.weight_scale.*scale -inf is not finite",
    ),
    "weight zero point 1000": (
        _put("a.weight_zero_point", lambda z: z + 1000),
        r"a\.weight_scale/zero_point: zero point 1000 outside the grid \[-128, 127\]",
    ),
    "weight zero point as float": (
        _put("a.weight_zero_point", lambda z: z.float()),
        "zero point is torch.float32, not an integer",
    ),
    "activation scale inf": (
        _put("aq_in_x.scale", torch.tensor(float("inf"))),
        r"aq_in_x\.scale/zero_point: scale inf is not finite and > 0",
    ),
    "activation scale negative": (
        _put("AQ.scale", torch.tensor(-0.1)),
        r"aq_\w+\.scale/zero_point: scale -0\.1",
    ),
    "activation zero point 1000": (
        _put("AQ.zero_point", torch.tensor(1000, dtype=torch.int32)),
        r"zero point 1000 outside the grid \[0, 255\] of its 8-bit asymmetric spec",
    ),
    "activation zero point -1": (
        _put("aq_in_x.zero_point", torch.tensor(-1, dtype=torch.int32)),
        r"aq_in_x.*zero point -1 outside the grid",
    ),
    "per-tensor scale with 3 values": (
        _put("aq_in_x.scale", torch.ones(3)),
        r"scale and zero point shapes differ",
    ),
    "activation range NaN": (
        _put("AQ.range", torch.tensor([0.0, float("nan")])),
        r"aq_\w+\.range: must be 2 finite floats",
    ),
    "float weight of another shape": (
        _put("__float_weight__.a", torch.zeros(5, 7)),
        r"__float_weight__\.a has shape \(5, 7\) in the file but \(5, 6\)",
    ),
    "float weight missing": (
        lambda t: t.pop("__float_weight__.b"),
        r"lacks __float_weight__\.b \(the float reference\)",
    ),
    "float bias of another shape": (
        _put("__bias_fp__.b", torch.zeros(4)),
        r"__bias_fp__\.b has shape \(4,\) in the file but \(3,\)",
    ),
    "corrected bias differs from the bias computed with": (
        _put("__bias_q__.a", lambda b: b + 1),
        r"a\.layer\.bias: differs from the layer's bias_q",
    ),
}


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_invalid_entry_is_a_load_error_naming_it(tiny_file, tmp_path, case):
    edit, match = INVALID[case]
    path = _edit(tiny_file, tmp_path / "edited.safetensors", edit)
    with pytest.raises(LoadError, match=match) as e:
        ptqkit.load(path, Tiny())
    assert str(path) in str(e.value)


def test_integer_weight_outside_its_grid_is_a_load_error(tmp_path):
    from ptqkit.io.packing import pack

    spec = QuantSpec(bits=3, per_channel=True)
    q = _quantize(_tiny(), [X], CFG.replace(weights=spec))
    ptqkit.save(q, tmp_path / "w3.safetensors")
    w = q.a.weight_int.clone()
    w[0, 0] = 11  # fits a packed nibble (11 + 4 = 15), not the 3-bit grid [-4, 3]
    put = _put("a.weight_int", pack(w, spec))
    path = _edit(tmp_path / "w3.safetensors", tmp_path / "e.safetensors", put)
    with pytest.raises(LoadError, match=r"a\.weight_int: integer weight 11 outside the grid"):
        ptqkit.load(path, Tiny())


def test_re_signed_unedited_file_loads(tiny_file, tmp_path):
    """The editing helper itself changes nothing when asked to change nothing."""
    path = _edit(tiny_file, tmp_path / "same.safetensors")
    assert path.read_bytes() == tiny_file.read_bytes()


# -- the float reference -------------------------------------------------------------------------
class ReLU6Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a1, self.dw, self.a2 = nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6()
        self.c2 = nn.Conv2d(8, 4, 1, bias=False)

    def forward(self, x):
        return self.c2(self.a2(self.dw(self.a1(self.bn(self.c1(x))))))


class LNFirst(PostLN):
    """The LayerNorm feeds one Linear only: SmoothQuant folds its scale into the LayerNorm."""

    def forward(self, x):
        return self.b(torch.relu(self.a(self.ln(x))))


def _relu6net() -> tuple[nn.Module, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    m = ReLU6Net().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        m.bn.running_mean.normal_(generator=g)
        m.bn.running_var.uniform_(0.5, 2.0, generator=g)
        m.bn.weight.uniform_(0.1, 3.0, generator=g)
    return m, [torch.randn(16, 3, 8, 8, generator=g) for _ in range(3)]


def _ln(arch) -> tuple[nn.Module, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    m = arch().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + 0.5)
    scale = torch.linspace(0.1, 10, 16)
    return m, [torch.randn(32, 16, generator=g) * scale + 1 for _ in range(3)]


FLOAT_CASES = {
    "cle": (_relu6net, CFG.replace(cle=True)),
    "bias-correction-empirical": (_relu6net, CFG.replace(bias_correction="empirical")),
    "bias-correction-analytic": (_relu6net, CFG.replace(bias_correction="analytic")),
    "cle+bias-correction": (_relu6net, CFG.replace(cle=True, bias_correction=True)),
    "smoothquant-explicit": (lambda: _ln(PostLN), CFG.replace(smoothquant=0.5)),
    "smoothquant-folded": (lambda: _ln(LNFirst), CFG.replace(smoothquant=0.5)),
    "smoothquant-untraceable": (lambda: _ln(BranchyLN), CFG.replace(smoothquant=0.5)),
}


@pytest.mark.parametrize("case", list(FLOAT_CASES), ids=list(FLOAT_CASES))
def test_float_mode_after_load_is_the_float_network_that_was_quantized(tmp_path, case):
    make, cfg = FLOAT_CASES[case]
    model, data = make()
    q = _quantize(model, data, cfg)
    x = data[0]
    with torch.no_grad():
        with float_mode(q):
            fp_before = q(x)
        # the stage did change the float weights or biases: they cannot come from the user model
        changed = any(
            not torch.equal(layer.weight_fp, model.get_submodule(n).weight)
            or isinstance(getattr(layer, "bias_fp", None), torch.Tensor)
            for n, layer in ptqkit.quant.modules.quant_layers(q).items()
            if n in dict(model.named_modules())
        )
        assert changed or case.startswith("cle")  # CLE also folds BN: weights differ anyway
        q_before = q(x)
    ptqkit.save(q, tmp_path / "q.safetensors")
    fresh, _ = make()
    with torch.no_grad():
        for p in fresh.parameters():  # the architecture's own weights must not matter
            p.add_(1.0)
    loaded = ptqkit.load(tmp_path / "q.safetensors", fresh)
    with torch.no_grad():
        with float_mode(loaded):
            fp_after = loaded(x)
        assert torch.equal(loaded(x), q_before)  # quantized: bit-identical
        assert (fp_after - fp_before).abs().max() <= 1e-6
        # and the float reference is the user's float network (up to the stage's rounding)
        ref = model(x)
        assert (fp_after - ref).abs().max() <= 1e-4 * ref.abs().max()
    # layers put back in float (the fallback's way) compute with the float weight and bias
    for layer in ptqkit.quant.modules.quant_layers(loaded).values():
        layer.use_float()
    for layer in ptqkit.quant.modules.quant_layers(q).values():
        layer.use_float()
    with torch.no_grad(), float_mode(q), float_mode(loaded):
        assert (loaded(x) - q(x)).abs().max() <= 1e-6


class Sub(nn.Module):
    """A constant and an operand order that change the result."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return torch.sub(self.a(x), self.b(x)).flatten(1) * 2.0


def _graph_edit(doc, fn):
    node = next(n for n in doc["graph"] if fn(n))
    return node


GRAPH_EDITS = {
    "constant": (
        lambda doc: _graph_edit(doc, lambda n: n["name"] == "mul")["args"]["tuple"].__setitem__(
            1, 3.0
        ),
        r"node mul \(_operator\.mul\) has other arguments",
    ),
    "operand order": (
        lambda doc: _graph_edit(doc, lambda n: n["name"] == "sub")["args"]["tuple"].reverse(),
        r"node sub .* has other arguments",
    ),
}


@pytest.mark.parametrize("case", list(GRAPH_EDITS), ids=list(GRAPH_EDITS))
def test_re_signed_graph_edits_are_load_errors(tmp_path, case):
    edit, match = GRAPH_EDITS[case]
    torch.manual_seed(0)
    q = _quantize(Sub().eval(), [X], CFG)
    ptqkit.save(q, tmp_path / "sub.safetensors")
    path = _edit(tmp_path / "sub.safetensors", tmp_path / "e.safetensors", edit_doc=edit)
    with pytest.raises(LoadError, match=match):
        ptqkit.load(path, Sub())


STRUCTURAL = {
    "smoothing scale 0": (
        lambda: _ln(PostLN),
        CFG.replace(smoothquant=0.5),
        lambda t: _first_key(t, ".inv_scale").mul_(0),
        r"inv_scale: must be a vector of finite values > 0",
    ),
    "smoothing scale of another length": (
        lambda: _ln(PostLN),
        CFG.replace(smoothquant=0.5),
        lambda t: t.update({_first_name(t, ".inv_scale"): torch.ones(3)}),
        r"inv_scale: has 3 values for the 16 inputs of a",
    ),
    "clamp with lo > hi": (
        _relu6net,
        CFG.replace(cle=True),
        lambda t: _first_key(t, ".lo").add_(100.0),
        r"lo/hi: must be two vectors of the same length, lo <= hi",
    ),
}


def _first_name(t, suffix):
    return sorted(k for k in t if k.endswith(suffix))[0]


def _first_key(t, suffix):
    name = _first_name(t, suffix)
    t[name] = t[name].clone()
    return t[name]


@pytest.mark.parametrize("case", list(STRUCTURAL), ids=list(STRUCTURAL))
def test_invalid_structural_module_is_a_load_error(tmp_path, case):
    make, cfg, edit, match = STRUCTURAL[case]
    model, data = make()
    q = _quantize(model, data, cfg)
    ptqkit.save(q, tmp_path / "q.safetensors")
    path = _edit(tmp_path / "q.safetensors", tmp_path / "e.safetensors", edit)
    with pytest.raises(LoadError, match=match):
        ptqkit.load(path, make()[0])


def test_a_file_of_the_older_format_is_refused_with_the_reason(tiny_file, tmp_path):
    path = _edit(
        tiny_file, tmp_path / "v1.safetensors", edit_doc=lambda d: d.update(format_version=1)
    )
    with pytest.raises(LoadError, match=r"format version 1 \(an older ptqkit\) has no digest"):
        ptqkit.load(path, Tiny())
