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
