"""A shared prefix (capture + one calibration pass with histograms + the bias-correction tap)
finishes any recipe that agrees on the prefix fields into the very model ``ptqkit.quantize``
returns for it; recipes that need another observer are refused, not approximated."""

from __future__ import annotations

import pytest
import torch

import ptqkit
from ptqkit.errors import ConfigError
from ptqkit.quant.modules import quant_layers
from ptqkit.recipe.prefix import build_prefix, can_serve, quantize_from

W4 = ptqkit.QuantSpec(bits=4, per_channel=True)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"calibration": "percentile", "bias_correction": "empirical"},
        {"calibration": "mse", "bias_correction": "analytic", "weight_calibration": "mse"},
        {"calibration": "kl"},
        {"calibration": "auto"},
        {"calibration": "percentile", "calibrator_options": {"percentile": 99.9}},
    ],
)
def test_prefix_gives_the_model_quantize_gives(digits_cnn, calib_batches, changes):
    base = ptqkit.PTQConfig(weights=W4, progress=False)
    prefix = build_prefix(digits_cnn, calib_batches, base)
    cfg = base.replace(**changes)
    assert can_serve(prefix, cfg)
    got = quantize_from(prefix, cfg)
    want = ptqkit.quantize(digits_cnn, calib_batches, cfg)
    x = calib_batches[0]
    with torch.no_grad():
        assert torch.equal(got(x), want(x))
        assert not torch.equal(got(x), digits_cnn(x))  # it is quantized
    for n, layer in quant_layers(want).items():
        assert torch.equal(quant_layers(got)[n].bias, layer.bias), n
    assert got.ptq_info.config == cfg.to_dict()
    assert set(want.ptq_info.stages) <= set(got.ptq_info.stages) | {"verify"}


def test_prefix_is_not_changed_by_a_recipe(digits_cnn, calib_batches):
    base = ptqkit.PTQConfig(weights=W4, progress=False)
    prefix = build_prefix(digits_cnn, calib_batches, base)
    a = quantize_from(prefix, base.replace(bias_correction="empirical"))
    b = quantize_from(prefix, base.replace(bias_correction="empirical"))
    x = calib_batches[1]
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_recipes_needing_their_own_pass_are_refused(digits_cnn, calib_batches):
    base = ptqkit.PTQConfig(weights=W4, progress=False)
    prefix = build_prefix(digits_cnn, calib_batches, base)
    for cfg in (
        base.replace(calibration="ema"),  # needs the batch sequence
        base.replace(calibration="mse", calibrator_options={"bins": 512}),  # other histogram
        base.replace(cle=True),  # another float model
    ):
        assert not can_serve(prefix, cfg)
        with pytest.raises(ConfigError, match="own calibration pass"):
            quantize_from(prefix, cfg)
