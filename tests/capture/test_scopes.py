"""Per-layer settings (``PTQConfig.scopes``): each layer gets the last matching scope's weight
spec or stays float, the result is recorded, saved, reloaded and exported as such, and a pattern
that matches no layer is an error."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import ptqkit
from ptqkit import ConfigError, PTQConfig, QuantSpec, Scope
from ptqkit.export import OrtModule
from ptqkit.quant.modules import quant_layers

W4 = QuantSpec(bits=4, symmetric=True, per_channel=True)
W6 = QuantSpec(bits=6, symmetric=True, per_channel=True)


def _cfg(*scopes) -> PTQConfig:
    return PTQConfig(progress=False, bias_correction=False, scopes=scopes)


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def test_last_match_wins_and_is_recorded(digits_cnn, calib_batches):
    cfg = _cfg(("conv*", {"weights": W4}), ("re:conv[3]", {"weights": W6}), ("fc", {"float": True}))
    q = ptqkit.quantize(digits_cnn, calib_batches, cfg)
    layers = quant_layers(q)
    assert layers["conv1"].spec.bits == 4 and layers["conv2"].spec.bits == 4
    assert layers["conv3"].spec.bits == 6 and "fc" not in layers
    # the integers really live on each layer's grid
    assert int(layers["conv1"].weight_int.abs().max()) <= 8
    assert int(layers["conv3"].weight_int.abs().max()) > 8
    s = q.ptq_info.layer_settings
    assert s["conv3"] == {"weights": W6.to_dict(), "scopes": ["conv*", "re:conv[3]"]}
    assert s["fc"] == {"float": True, "scopes": ["fc"]}
    assert "fc" in q.ptq_info.skipped and "scope 'fc'" in q.ptq_info.skip_reasons["fc"]
    # and it computes what it says: W4 layers cost accuracy that the W8 base does not
    base = ptqkit.quantize(digits_cnn, calib_batches, _cfg())
    x = calib_batches[0]
    with torch.no_grad():
        ref = digits_cnn(x)
        assert _sqnr(ref, q(x)) < _sqnr(ref, base(x))


def test_type_patterns_and_class_names(digits_cnn, calib_batches):
    by_type = ptqkit.quantize(digits_cnn, calib_batches, _cfg(Scope(nn.Linear, weights=W4)))
    by_name = ptqkit.quantize(digits_cnn, calib_batches, _cfg(("Linear", {"weights": W4})))
    for q in (by_type, by_name):
        bits = {n: m.spec.bits for n, m in quant_layers(q).items()}
        assert bits == {"conv1": 8, "conv2": 8, "conv3": 8, "fc": 4}


def test_a_pattern_that_matches_nothing_is_named(digits_cnn, calib_batches):
    with pytest.raises(ConfigError, match=r"\['blocks\.1\*'\].*conv1"):
        ptqkit.quantize(digits_cnn, calib_batches, _cfg(("conv1", {"weights": W4}),
                                                         ("blocks.1*", {"weights": W4})))


@pytest.mark.parametrize(
    ("scope", "message"),
    [
        (("fc", {"bits": 4}), r"unknown override\(s\) \['bits'\]"),
        (("fc", {"weights": {"bits": 1}}), "bits"),
        (("", {"float": True}), "pattern"),
        (("re:(", {"float": True}), "regular expression"),
        ("fc", "pattern, overrides"),
        ({"weights": {"bits": 4}}, "needs a 'pattern'"),
    ],
)
def test_bad_scopes_are_config_errors(scope, message):
    with pytest.raises(ConfigError, match=message):
        PTQConfig(scopes=[scope])


def test_dict_round_trip_and_toml_form():
    cfg = _cfg(("conv*", {"weights": W4}), {"pattern": "fc", "float": True})
    d = cfg.to_dict()
    assert d["scopes"] == [{"pattern": "conv*", "weights": W4.to_dict()},
                           {"pattern": "fc", "float": True}]
    assert PTQConfig.from_dict(d) == cfg


def test_mixed_widths_save_reload_and_export(digits_cnn, calib_batches, tmp_path):
    """A W4 layer beside W8 layers: the saved file reloads bit-identically, and the int8 ONNX
    model runs in ONNX Runtime with each layer's own integers."""
    cfg = _cfg(("conv2", {"weights": W4}))
    q = ptqkit.quantize(digits_cnn, calib_batches, cfg)
    path = tmp_path / "m.ptq.safetensors"
    ptqkit.save(q, path)
    back = ptqkit.load(path, digits_cnn)
    x = calib_batches[0]
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    assert quant_layers(back)["conv2"].spec.bits == 4
    # int8 container, to read the grids (the default may be uint8 = int8 + 128 on CPUs
    # without VNNI: the same integers, shifted)
    g = onnx.load(str(ptqkit.export_onnx(q, tmp_path / "s8.onnx", x[:1], weights="int8"))).graph
    ranges = sorted(
        int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max())
        for t in g.initializer
        if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and t.dims
        and np.prod(t.dims) > 64
    )
    assert ranges[0] <= 8 < ranges[-1]  # one weight on the 4-bit grid, the others on 8 bits
    ort = OrtModule(ptqkit.export_onnx(q, tmp_path / "m.onnx", x[:1]), threads=1)
    with torch.no_grad():
        sim = q(x)
    out = ort(x)
    assert (out.argmax(1) == sim.argmax(1)).float().mean() >= 0.95


def test_toml_config_takes_the_same_scopes(tmp_path):
    from ptqkit.cli.config_file import load_config

    p = tmp_path / "c.toml"
    p.write_text(
        '[[scopes]]\npattern = "_blocks.1*"\nweights = { bits = 4, per_channel = true }\n\n'
        '[[scopes]]\npattern = "_fc"\nfloat = true\n'
    )
    cfg = load_config(str(p))
    assert cfg.scopes == (Scope("_blocks.1*", weights=W4), Scope("_fc", float=True))


def test_the_report_lists_each_scope(digits_cnn, calib_batches):
    from ptqkit.report.summary import summary_rows

    q = ptqkit.quantize(digits_cnn, calib_batches, _cfg(("conv*", {"weights": W4}),
                                                        ("conv3", {"float": True})))
    rows = dict(summary_rows(q))
    assert rows["scope 'conv*'"].startswith("4-bit symmetric per-channel: matches 3 layer(s)")
    assert rows["scope 'conv*'"].endswith("of 2: conv1, conv2")
    assert rows["scope 'conv3'"] == "float: matches 1 layer(s), the last match of 1: conv3"
