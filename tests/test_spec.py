"""ptqkit.spec: QuantSpec and Scope in their own module, re-exported by ptqkit.config and
ptqkit; PTQConfig's per-field validator table names real fields only."""

from __future__ import annotations

import dataclasses

import pytest

import ptqkit
from ptqkit import config, spec
from ptqkit.errors import ConfigError


def test_reexported_objects_are_the_same() -> None:
    assert config.QuantSpec is spec.QuantSpec is ptqkit.QuantSpec
    assert config.Scope is spec.Scope is ptqkit.Scope


def test_every_validator_names_a_field() -> None:
    names = {f.name for f in dataclasses.fields(config.PTQConfig)}
    assert set(config._CHECKS) <= names
    # every field but none is checked: a field added without a validator shows here
    assert names - set(config._CHECKS) == set()


def test_validators_normalize_and_refuse() -> None:
    c = config.PTQConfig(
        weights={"bits": 4, "per_channel": True}, skip="fc", gptq=True, bias_correction=True
    )
    assert c.weights == spec.QuantSpec(bits=4, per_channel=True)
    assert c.skip == ("fc",) and c.bias_correction == "empirical"
    assert isinstance(c.gptq, ptqkit.GPTQOptions)
    assert config.PTQConfig(gptq=False).gptq is None
    with pytest.raises(ConfigError, match="seed"):
        config.PTQConfig(seed=1.5)
    with pytest.raises(ConfigError, match="min_sqnr_db"):
        config.PTQConfig(min_sqnr_db=float("nan"))
    with pytest.raises(ConfigError, match="gptq and adaround"):
        config.PTQConfig(gptq=True, adaround=True)


def test_from_fields_names_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown QuantSpec key\(s\): \['bitz'\]"):
        spec.QuantSpec.from_dict({"bitz": 4})


def test_scope_techniques_round_trip_and_refuse() -> None:
    sc = spec.Scope.of({"pattern": "fc", "techniques": {"bias_correction": False, "gptq": True}})
    assert sc.techniques == {"bias_correction": False, "gptq": True}
    assert sc.to_dict() == {"pattern": "fc", "techniques": {"bias_correction": False, "gptq": True}}
    assert spec.Scope("fc").to_dict() == {"pattern": "fc"}  # no key when it sets none
    c = config.PTQConfig(scopes=[("conv*", {"techniques": {"adaround": False}})])
    assert config.PTQConfig.from_dict(c.to_dict()) == c
    switches = {"adaround": False}
    s2 = spec.Scope("fc", techniques=switches)
    switches["adaround"] = True  # the scope holds its own copy
    assert s2.techniques == {"adaround": False}
    with pytest.raises(ConfigError, match=r"techniques\['adaround'\] must be False .* or True"):
        spec.Scope("fc", techniques={"adaround": {"iters": 3}})
    with pytest.raises(ConfigError, match="techniques must be a dict"):
        spec.Scope("fc", techniques=["adaround"])
    with pytest.raises(ConfigError, match=r"unknown override\(s\) \['off'\]"):
        spec.Scope.of(("fc", {"off": ["adaround"]}))


def test_the_last_matching_scope_that_names_a_technique_decides() -> None:
    from types import SimpleNamespace

    from torch import nn

    scopes = (
        spec.Scope("conv*", techniques={"adaround": False, "gptq": False}),
        spec.Scope(nn.Conv2d, techniques={"gptq": True}),  # by type: the wrapped layer's
        spec.Scope("conv2", float=True),  # names no technique: decides none
    )
    conv, fc = nn.Conv2d(1, 1, 1), nn.Linear(1, 1)
    assert spec.technique_scope(scopes, "adaround", "conv2", conv) is scopes[0]
    assert spec.technique_scope(scopes, "gptq", "conv2", conv) is scopes[1]
    assert spec.technique_scope(scopes, "adaround", "fc", fc) is None
    c = config.PTQConfig(scopes=scopes)
    layers = {"conv1": SimpleNamespace(layer=conv), "fc": SimpleNamespace(layer=fc)}
    assert c.off_layers("adaround", layers) == {"conv1": "conv*"}
    assert c.off_layers("gptq", layers) == {}  # on again for every Conv2d
    assert c.off_layers("cle", layers) == {}
