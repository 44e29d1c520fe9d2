"""Validation and dict round trip of :class:`QuantSpec` and :class:`PTQConfig`."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ptqkit
from ptqkit import CALIBRATORS, PTQConfig, QuantSpec
from ptqkit.errors import ConfigError, PTQError

# -- QuantSpec ------------------------------------------------------------------------------------


def test_quantspec_defaults_and_grids():
    s = QuantSpec()
    assert (s.bits, s.symmetric, s.per_channel, s.axis) == (8, True, False, 0)
    assert (s.qmin, s.qmax) == (-128, 127)
    a = QuantSpec(symmetric=False)
    assert (a.qmin, a.qmax) == (0, 255)
    assert (QuantSpec(bits=2).qmin, QuantSpec(bits=2).qmax) == (-2, 1)
    assert (QuantSpec(bits=16, symmetric=False).qmin, QuantSpec(bits=16, symmetric=False).qmax) == (
        0,
        65535,
    )


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 15, 16])
def test_quantspec_accepts_bits_2_to_16(bits):
    assert QuantSpec(bits=bits).bits == bits


@pytest.mark.parametrize("bits", [-8, 0, 1, 17, 32, 64])
def test_quantspec_rejects_bits_outside_2_to_16(bits):
    with pytest.raises(ConfigError, match="bits"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 8.0},
        {"bits": "8"},
        {"bits": True},
        {"bits": None},
        {"symmetric": 1},
        {"symmetric": "yes"},
        {"symmetric": None},
        {"per_channel": 0},
        {"per_channel": "true"},
        {"axis": 1.0},
        {"axis": True},
        {"axis": "0"},
        {"axis": None},
    ],
    ids=repr,
)
def test_quantspec_rejects_wrong_types(kwargs):
    (name,) = kwargs
    with pytest.raises(ConfigError, match=name):
        QuantSpec(**kwargs)


def test_config_error_is_a_value_error_and_a_ptq_error():
    with pytest.raises(ValueError):
        QuantSpec(bits=1)
    with pytest.raises(PTQError):
        QuantSpec(bits=1)


def test_quantspec_is_frozen_and_hashable():
    s = QuantSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.bits = 4
    assert hash(s) == hash(QuantSpec())
    assert {s, QuantSpec(), QuantSpec(bits=4)} == {QuantSpec(), QuantSpec(bits=4)}


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    bits=st.integers(2, 16),
    symmetric=st.booleans(),
    per_channel=st.booleans(),
    axis=st.integers(-4, 4),
)
def test_quantspec_dict_round_trip(bits, symmetric, per_channel, axis):
    s = QuantSpec(bits=bits, symmetric=symmetric, per_channel=per_channel, axis=axis)
    d = s.to_dict()
    assert d == {"bits": bits, "symmetric": symmetric, "per_channel": per_channel, "axis": axis}
    assert QuantSpec.from_dict(d) == s
    assert QuantSpec.from_dict(json.loads(json.dumps(d))) == s


def test_quantspec_from_dict_partial_uses_defaults():
    assert QuantSpec.from_dict({"bits": 4}) == QuantSpec(bits=4)
    assert QuantSpec.from_dict({}) == QuantSpec()


def test_quantspec_from_dict_rejects_unknown_keys_and_non_dicts():
    with pytest.raises(ConfigError, match="nbits"):
        QuantSpec.from_dict({"nbits": 8})
    with pytest.raises(ConfigError, match="unknown"):
        QuantSpec.from_dict({"bits": 8, "symmetric": True, "rounding": "even"})
    with pytest.raises(ConfigError, match="dict"):
        QuantSpec.from_dict([("bits", 8)])
    with pytest.raises(ConfigError, match="bits"):
        QuantSpec.from_dict({"bits": 99})


# -- PTQConfig ------------------------------------------------------------------------------------


def test_ptqconfig_defaults():
    c = PTQConfig()
    assert c.weights == QuantSpec(bits=8, symmetric=True, per_channel=True, axis=0)
    assert c.activations == QuantSpec(bits=8, symmetric=False, per_channel=False)
    assert c.calibration == "mse"  # with auto bias correction: the best single recipe (issue 14)
    assert c.bias_correction == "auto"
    assert c.skip == ()


@pytest.mark.parametrize("name", [*sorted(CALIBRATORS), "auto"])
def test_ptqconfig_accepts_every_registered_calibrator(name):
    assert PTQConfig(calibration=name).calibration == name


@pytest.mark.parametrize("name", ["", 3, None])
def test_ptqconfig_rejects_a_calibration_that_is_no_name(name):
    with pytest.raises(ConfigError, match="calibration"):
        PTQConfig(calibration=name)


@pytest.mark.parametrize("name", ["entropy", "KL", "min_max"])
def test_an_unregistered_calibration_is_refused_where_it_is_used(name):
    from ptqkit.calibrate import check_calibration

    cfg = PTQConfig(calibration=name)  # may be registered later
    with pytest.raises(ConfigError, match=f"unknown calibration '{name}'"):
        check_calibration(cfg.calibration)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weights": 8},
        {"weights": None},
        {"activations": "int8"},
        {"activations": {"bits": 1}},
        {"weights": {"bits": 8, "sign": True}},
        {"weight_calibration": "kl"},
        {"calibrator_options": [("percentile", 99.9)]},
        {"num_batches": 0},
        {"num_batches": -3},
        {"num_batches": 2.0},
        {"num_batches": True},
        {"skip": [1, 2]},
        {"skip": 3},
        {"fold_bn": "yes"},
        {"cle": 1},
        {"adaround": None},
        {"progress": 0},
        {"bias_correction": "yes"},
        {"bias_correction": 1.0},
        {"adaround_iters": 0},
        {"adaround_iters": 10.0},
        {"adaround_iters": True},
        {"smoothquant": 1.5},
        {"smoothquant": -0.1},
        {"smoothquant": True},
        {"smoothquant": "0.5"},
        {"max_degradation": -1.0},
        {"max_degradation": "1"},
        {"min_sqnr_db": "30"},
        {"seed": 1.5},
        {"seed": True},
        {"seed": None},
    ],
    ids=repr,
)
def test_ptqconfig_rejects_bad_fields(kwargs):
    with pytest.raises(ConfigError):
        PTQConfig(**kwargs)


def test_ptqconfig_normalizes_fields():
    c = PTQConfig(
        weights={"bits": 4, "per_channel": True},
        activations=None,
        skip="fc*",
        bias_correction=True,
    )
    assert c.weights == QuantSpec(bits=4, per_channel=True)
    assert c.activations is None
    assert c.skip == ("fc*",)
    assert c.bias_correction == "empirical"
    assert PTQConfig(skip=["a", "b"]).skip == ("a", "b")
    assert PTQConfig(num_batches=1).num_batches == 1
    assert PTQConfig(smoothquant=0).smoothquant == 0
    assert PTQConfig(bias_correction="analytic").bias_correction == "analytic"


def test_ptqconfig_is_frozen_and_replace_revalidates():
    c = PTQConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.calibration = "kl"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.weights = QuantSpec()
    assert c.replace(calibration="kl").calibration == "kl"
    assert c.calibration == "mse"
    with pytest.raises(ConfigError):
        c.replace(calibration="")
    with pytest.raises(ConfigError):
        c.replace(num_batches=0)


def test_a_calibrator_name_is_checked_where_it_is_used(digits_cnn, calib_batches):
    """A config may name a calibrator registered later (a plugin, a config read from a file);
    ``quantize`` checks the name before any work, and the registry is read-only."""
    from ptqkit.calibrate import calibrators, register_calibrator

    cfg = PTQConfig(calibration="later_test", progress=False)
    with pytest.raises(ConfigError, match="unknown calibration 'later_test'"):
        ptqkit.quantize(digits_cnn, calib_batches, cfg)
    register_calibrator("later_test", calibrators.MinMaxCalibrator)
    try:
        q = ptqkit.quantize(digits_cnn, calib_batches, cfg)
        ref = ptqkit.quantize(digits_cnn, calib_batches, cfg.replace(calibration="minmax"))
        x = calib_batches[0]
        with torch.no_grad():
            assert torch.equal(q(x), ref(x))
    finally:
        calibrators._REGISTRY.pop("later_test")
    with pytest.raises(TypeError):
        CALIBRATORS["mine"] = calibrators.MinMaxCalibrator  # type: ignore[index]
    with pytest.raises(ConfigError, match="other than 'auto'"):
        register_calibrator("auto", calibrators.MinMaxCalibrator)


def test_ptqconfig_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="calibrator"):
        PTQConfig.from_dict({"calibrator": "kl"})
    with pytest.raises(ConfigError, match=r"\['bogus', 'zzz'\]"):
        PTQConfig.from_dict({"calibration": "kl", "zzz": 1, "bogus": 2})
    with pytest.raises(ConfigError, match="dict"):
        PTQConfig.from_dict("calibration=kl")
    with pytest.raises(ConfigError, match="unknown QuantSpec"):
        PTQConfig.from_dict({"weights": {"bits": 8, "channels": 3}})


configs = st.builds(
    PTQConfig,
    weights=st.builds(
        QuantSpec,
        bits=st.integers(2, 16),
        symmetric=st.booleans(),
        per_channel=st.booleans(),
        axis=st.integers(0, 3),
    ),
    activations=st.one_of(
        st.none(), st.builds(QuantSpec, bits=st.integers(2, 16), symmetric=st.booleans())
    ),
    calibration=st.sampled_from([*sorted(CALIBRATORS), "auto"]),
    weight_calibration=st.sampled_from(["minmax", "mse"]),
    calibrator_options=st.sampled_from([{}, {"percentile": 99.9}, {"bins": 2048}]),
    num_batches=st.one_of(st.none(), st.integers(1, 1000)),
    skip=st.lists(st.sampled_from(["fc", "*.downsample*", "Conv2d"]), max_size=3).map(tuple),
    fold_bn=st.booleans(),
    cle=st.booleans(),
    bias_correction=st.sampled_from([False, "empirical", "analytic"]),
    adaround=st.booleans(),
    adaround_iters=st.integers(1, 10_000),
    smoothquant=st.one_of(st.none(), st.floats(0.0, 1.0)),
    max_degradation=st.one_of(st.none(), st.floats(0.0, 100.0)),
    min_sqnr_db=st.one_of(st.none(), st.floats(-10.0, 80.0)),
    progress=st.booleans(),
    seed=st.integers(0, 2**31),
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(cfg=configs)
def test_ptqconfig_dict_round_trip(cfg):
    d = cfg.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(PTQConfig)}
    assert isinstance(d["weights"], dict) and isinstance(d["skip"], list)
    assert PTQConfig.from_dict(d) == cfg
    # through JSON, as a config file would be read
    assert PTQConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_recipe_leaves_out_run_time_settings():
    a, b = PTQConfig(progress=True), PTQConfig(progress=False)
    assert a.recipe() == b.recipe() and "progress" not in a.recipe()
    assert PTQConfig(cle=True).recipe() != a.recipe()
