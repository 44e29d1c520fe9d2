"""A scope turns registered techniques off for some layers (``Scope.techniques``): the layer it
matches gets what the pipeline gives with the technique off entirely (bit for bit: its bias
uncorrected, its integers nearest rounding, its weights unequalized / unsmoothed, never kept in
float by the fallback), the layers before it what the technique gives them without the scope, and
the record, the layer settings, the report, the saved file and the TOML config say so; a name
that is not a registered per-layer technique is a ConfigError, a technique the config leaves off
a PTQWarning."""

from __future__ import annotations

import warnings

import pytest
import torch
from _blocks import outlier_norm
from _certain import certain_agreement
from torch import nn

import ptqkit
from ptqkit import ConfigError, PTQConfig, PTQWarning, QuantSpec, Scope
from ptqkit.quant.modules import quant_layers
from ptqkit.quant.primitives import sqnr_db
from ptqkit.techniques import check
from ptqkit.techniques.awq import AWQOptions


def _off(pattern, *names: str) -> Scope:
    return Scope(pattern, techniques=dict.fromkeys(names, False))


def _run(model, data, **cfg) -> nn.Module:
    return ptqkit.quantize(model, data, PTQConfig(progress=False, **cfg))


def _against_fp32(model: nn.Module, q: nn.Module, x: torch.Tensor) -> None:
    """8-bit arithmetic: the output within 25 dB of FP32 (~40 here), and the top-1 agreement at
    least what that error allows (a theorem, tests/_certain.py)."""
    with torch.no_grad():
        f, y = model(x), q(x)
    agree = 100.0 * float((f.argmax(1) == y.argmax(1)).double().mean())
    assert sqnr_db(f, y) > 25 and agree >= certain_agreement(f, y)


# -- bias correction ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["empirical", "affine", "analytic"])
def test_bias_correction_off_for_one_layer(digits_cnn, calib_batches, mode):
    none = _run(digits_cnn, calib_batches, bias_correction=False)
    full = _run(digits_cnn, calib_batches, bias_correction=mode)
    scoped = _run(digits_cnn, calib_batches, bias_correction=mode,
                  scopes=[_off("conv2", "bias_correction")])
    n, f, s = (quant_layers(m) for m in (none, full, scoped))
    rec = scoped.ptq_info.details["bias_correction"]
    assert rec["off_by_scope"] == {"conv2": "conv2"} and "conv2" not in rec["corrected"]
    # the layer the scope matches: bias and weight scale as with bias correction off, bit for bit
    assert torch.equal(s["conv2"].bias, n["conv2"].bias)
    assert torch.equal(s["conv2"].weight_scale, n["conv2"].weight_scale)
    assert torch.equal(s["conv2"].weight_int, n["conv2"].weight_int)
    # the layers before it: what bias correction gives them without the scope
    assert torch.equal(s["conv1"].bias, f["conv1"].bias)
    # every layer it corrected has another bias than uncorrected; some it did correct
    assert rec["corrected"] and set(rec["corrected"]) <= {"conv1", "conv3", "fc"}
    for name in rec["corrected"]:
        assert not torch.equal(s[name].bias, n[name].bias), name
    settings = scoped.ptq_info.layer_settings
    assert settings["conv2"]["techniques_off"] == {"bias_correction": "conv2"}
    assert "techniques_off" not in settings["conv1"]
    _against_fp32(digits_cnn, scoped, calib_batches[0])


def test_last_match_wins_per_technique(digits_cnn, calib_batches):
    """``conv*`` off, then ``conv3`` on again: conv1 and conv2 off, conv3 corrected; a later
    scope that names another technique leaves this one as it was."""
    scopes = [_off("conv*", "bias_correction"),
              Scope("conv3", techniques={"bias_correction": True}),
              _off("conv3", "adaround")]
    q = _run(digits_cnn, calib_batches, bias_correction="empirical", scopes=scopes)
    rec = q.ptq_info.details["bias_correction"]
    assert rec["off_by_scope"] == {"conv1": "conv*", "conv2": "conv*"}
    assert "conv3" in rec["corrected"]
    assert q.ptq_info.layer_settings["conv3"]["techniques_off"] == {"adaround": "conv3"}
    assert any("does not enable 'adaround'" in w for w in q.ptq_info.warnings)


# -- adaround, block reconstruction, GPTQ ------------------------------------------------------
def test_adaround_off_for_one_layer_is_nearest_rounding(digits_cnn, calib_batches):
    base = {"bias_correction": False, "adaround_iters": 60}
    nearest = quant_layers(_run(digits_cnn, calib_batches, bias_correction=False))
    full = quant_layers(_run(digits_cnn, calib_batches, adaround=True, **base))
    scopes = [_off("re:conv2", "adaround")]
    q = _run(digits_cnn, calib_batches, adaround=True, scopes=scopes, **base)
    s = quant_layers(q)
    assert torch.equal(s["conv2"].weight_int, nearest["conv2"].weight_int)
    assert torch.equal(s["conv2"].weight_scale, nearest["conv2"].weight_scale)
    # conv1 runs before it: its learned rounding is the one without the scope
    assert torch.equal(s["conv1"].weight_int, full["conv1"].weight_int)
    rec = q.ptq_info.details["adaround"]
    assert rec["off_by_scope"] == {"conv2": "re:conv2"}
    assert rec["layers"]["conv2"] == {"off_by_scope": "re:conv2"}
    learned = [n for n in ("conv1", "conv3", "fc") if rec["layers"][n].get("kept") != "nearest"]
    assert learned
    for name in learned:  # AdaRound's integers, not nearest rounding's
        assert not torch.equal(s[name].weight_int, nearest[name].weight_int), name
    assert q.ptq_info.layer_settings["conv2"]["techniques_off"] == {"adaround": "re:conv2"}
    _against_fp32(digits_cnn, q, calib_batches[0])


def test_block_reconstruction_keeps_the_scoped_layer_nearest(digits_cnn, calib_batches):
    opts = {"granularity": "block", "block_samples": 128}
    base = {"bias_correction": False, "adaround_iters": 30, "adaround_options": opts}
    nearest = quant_layers(_run(digits_cnn, calib_batches, bias_correction=False))
    q = _run(digits_cnn, calib_batches, adaround=True, scopes=[_off("conv2", "adaround")], **base)
    rec = q.ptq_info.details["adaround"]
    assert rec["granularity"] == "block"
    assert rec["layers"]["conv2"]["off_by_scope"] == "conv2"
    s = quant_layers(q)
    assert torch.equal(s["conv2"].weight_int, nearest["conv2"].weight_int)
    assert any(not torch.equal(s[n].weight_int, nearest[n].weight_int) for n in ("conv1", "fc"))
    _against_fp32(digits_cnn, q, calib_batches[0])


def test_gptq_off_by_module_type(digits_cnn, calib_batches):
    """A type pattern (``nn.Linear``) matches the float layer a quantized one wraps."""
    nearest = quant_layers(_run(digits_cnn, calib_batches, bias_correction=False))
    full = quant_layers(_run(digits_cnn, calib_batches, bias_correction=False, gptq=True))
    q = _run(digits_cnn, calib_batches, bias_correction=False, gptq=True,
             scopes=[_off(nn.Linear, "gptq")])
    s = quant_layers(q)
    assert torch.equal(s["fc"].weight_int, nearest["fc"].weight_int)
    for name in ("conv1", "conv2", "conv3"):  # before fc: GPTQ's integers, as without the scope
        assert torch.equal(s[name].weight_int, full[name].weight_int), name
    assert any(not torch.equal(s[n].weight_int, nearest[n].weight_int) for n in ("conv1", "conv3"))
    rec = q.ptq_info.details["gptq"]
    assert rec["off_by_scope"] == {"fc": "Linear"}
    assert rec["layers"]["fc"] == {"off_by_scope": "Linear"}
    _against_fp32(digits_cnn, q, calib_batches[0])


# -- CLE, SmoothQuant, AWQ: layers in pairs and groups -----------------------------------------
def _chain() -> nn.Module:
    """conv → ReLU → conv → ReLU → conv → ReLU → pool → Linear: three pairs in a row."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()


def test_cle_skips_the_pairs_of_a_layer_turned_off(digits_data):
    x = digits_data[0][:128]
    data = [x[:64], x[64:]]
    model = _chain()
    plain = quant_layers(_run(model, data, bias_correction=False))  # no CLE
    full = _run(model, data, bias_correction=False, cle=True)
    pairs = [(p["first"], p["second"]) for p in full.ptq_info.details["cle"]["pairs"]]
    assert pairs
    first, second = pairs[0]
    q = _run(model, data, bias_correction=False, cle=True, scopes=[_off(second, "cle")])
    rec = q.ptq_info.details["cle"]
    kept = [(p["first"], p["second"]) for p in rec["pairs"]]
    assert kept == [p for p in pairs if second not in p]
    assert rec["off_by_scope"] == {second: second} and "turns CLE off" in rec["not_paired"][first]
    # its weights, and those of the other layer of its pairs, as without CLE
    s = quant_layers(q)
    for name in {n for p in pairs if second in p for n in p} - {n for p in kept for n in p}:
        assert torch.equal(s[name].weight_int, plain[name].weight_int), name
    _against_fp32(model, q, x)


class _TwoHeads(nn.Module):
    """One LayerNorm output read by two Linears (SmoothQuant/AWQ fold 1/s into it when both
    are scaled)."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ln = outlier_norm(d, (3, 11), 30.0)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return self.q(h) + self.k(h)


class _TwoHeadsUntraced(_TwoHeads):
    """The same with data-dependent control flow: captured with hooks, no graph (the layers
    reading the LayerNorm output are found by tensor identity)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        if h.mean() > 100:  # torch.fx cannot trace it
            h = h * 0
        return self.q(h) + self.k(h)


def _seq(n: int = 16, d: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 6, d, generator=g) for _ in range(n)]


W4 = QuantSpec(bits=4, symmetric=True, per_channel=True)


@pytest.mark.parametrize("kind", [_TwoHeads, _TwoHeadsUntraced])
@pytest.mark.parametrize(
    ("setting", "name", "least_db"),
    [
        ({"smoothquant": 0.5}, "smoothquant", 25.0),  # W8A8
        ({"techniques": {"awq": AWQOptions(grid=10)}, "weights": W4}, "awq", 12.0),  # W4A8
    ],
)
def test_smoothing_leaves_a_layer_turned_off_as_it_is(setting, name, least_db, kind):
    """The LayerNorm output both Linears read is not folded into (k reads it unscaled): q gets
    its scale in an explicit quantizer; the float function is unchanged (checked by the stage),
    and the output is what the bits allow of FP32 (a fixed model, seeded: no training)."""
    model, data = kind().eval(), _seq()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "(?s).*captured with hooks", PTQWarning)
        q = _run(model, data, bias_correction=False, scopes=[_off("k", name)], **setting)
    s = quant_layers(q)
    assert torch.equal(s["k"].weight_fp, model.k.weight.detach())  # not scaled
    assert not torch.equal(s["q"].weight_fp, model.q.weight.detach())  # scaled
    assert torch.equal(q.ln.weight, model.ln.weight)  # not folded into the shared LayerNorm
    rec = q.ptq_info.details[name]
    assert rec["off_by_scope"] == {"k": "k"} and "k" not in rec["layers"]
    with torch.no_grad():
        f = model(data[0])
        assert sqnr_db(f, q(data[0])) > least_db


# -- fallback --------------------------------------------------------------------------------
def test_fallback_never_keeps_a_layer_turned_off_in_float(digits_cnn, calib_batches):
    with pytest.warns(PTQWarning, match="cannot be met"):
        q = _run(digits_cnn, calib_batches, bias_correction=False, min_sqnr_db=300.0,
                 scopes=[_off("fc", "fallback")])
    rec = q.ptq_info.details["fallback"]
    assert rec["off_by_scope"] == {"fc": "fc"}
    kept = [k["layer"] for k in rec["kept_float"]]
    assert kept and "fc" not in kept
    assert quant_layers(q)["fc"].quantized


# -- records, round trips, errors ------------------------------------------------------------
def test_saved_and_reloaded_with_the_scope(digits_cnn, calib_batches, tmp_path):
    from ptqkit.report.summary import summary_rows

    cfg = PTQConfig(progress=False, bias_correction="empirical",
                    scopes=[_off("conv2", "bias_correction")])
    q = ptqkit.quantize(digits_cnn, calib_batches, cfg)
    path = tmp_path / "m.ptq.safetensors"
    ptqkit.save(q, path)
    back = ptqkit.load(path, digits_cnn)
    assert back.ptq_config == cfg and back.ptq_config.scopes[0].techniques == {
        "bias_correction": False
    }
    assert back.ptq_info.layer_settings["conv2"]["techniques_off"] == {"bias_correction": "conv2"}
    x = calib_batches[0]
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    rows = dict(summary_rows(q))
    assert rows["scope 'conv2'"].startswith("bias_correction off: matches 1 layer(s)")


def test_toml_scopes_take_techniques(tmp_path):
    from ptqkit.cli.config_file import load_config
    from ptqkit.cli.usage import UsageError

    p = tmp_path / "c.toml"
    p.write_text('[[scopes]]\npattern = "fc"\ntechniques = { bias_correction = false }\n')
    assert load_config(str(p)).scopes == (_off("fc", "bias_correction"),)
    p.write_text('[[scopes]]\npattern = "fc"\ntechniques = { bias_corection = false }\n')
    with pytest.raises(UsageError, match=r"c\.toml.*no technique named 'bias_corection'"):
        load_config(str(p))


@pytest.mark.parametrize(
    ("techniques", "message"),
    [
        ({"bias_corection": False}, r"no technique named 'bias_corection'; registered: \[.*"
                                    r"'bias_correction'"),
        ({"calibrate": False}, r"scope 'fc': technique 'calibrate' cannot be turned off"),
        ({"weights": False}, r"float=True"),
    ],
)
def test_names_a_scope_cannot_turn_off_are_errors(techniques, message):
    with pytest.raises(ConfigError, match=message):
        check(PTQConfig(scopes=[Scope("fc", techniques=techniques)]))


def test_unknown_name_stops_quantize_before_it_starts(digits_cnn, calib_batches):
    with pytest.raises(ConfigError, match="no technique named 'adarond'"):
        _run(digits_cnn, calib_batches, scopes=[_off("fc", "adarond")])


def test_a_technique_the_config_leaves_off_is_a_warning(digits_cnn, calib_batches):
    with pytest.warns(PTQWarning, match=r"turn off 'gptq' for 1 layer\(s\), but the config"):
        q = _run(digits_cnn, calib_batches, bias_correction=False, scopes=[_off("fc", "gptq")])
    assert quant_layers(q)["fc"].quantized


def test_the_per_layer_techniques_are_the_registry_s():
    from ptqkit.techniques import pipeline

    per_layer = {t.name for t in pipeline() if t.per_layer}
    assert per_layer == {"adaround", "awq", "bias_correction", "cle", "fallback", "gptq",
                         "smoothquant"}

