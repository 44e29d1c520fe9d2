"""The chapter's best practices as rules: each triggers on the measurement it is about, and only
then; the facts come from a real quantized model."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit import advice
from ptqkit.advice import RULES, Facts, advise, gather, rule

CONFIG = ptqkit.PTQConfig(calibration="minmax", bias_correction=False).to_dict()


def names(facts: Facts) -> set[str]:
    return {a.rule for a in advise(facts)}


def test_clean_facts_trigger_nothing_but_the_evaluation_tip():
    f = Facts(config=CONFIG, calibration_samples=512, metric="top1", degradation=0.3)
    assert names(f) == set()
    assert names(Facts(config=CONFIG, calibration_samples=512)) == {"validation_set"}


def test_few_calibration_samples():
    f = Facts(config=CONFIG, calibration_samples=64, degradation=0.0)
    (a,) = advise(f)
    assert a.rule == "calibration_samples" and a.level == "warning"
    assert "64 samples" in a.message and "100-1000" in a.message
    assert names(Facts(config=CONFIG, calibration_samples=100, degradation=0.0)) == set()
    # weights only: nothing was calibrated, the rule does not apply
    wo = dict(CONFIG, activations=None)
    assert "calibration_samples" not in names(Facts(config=wo, calibration_samples=3))


def test_degradation_suggests_only_what_was_not_tried():
    f = Facts(config=CONFIG, calibration_samples=512, metric="top1", degradation=2.5)
    msgs = {a.rule: a.message for a in advise(f)}
    assert {"degradation", "try_calibrators"} <= set(msgs)
    m = msgs["degradation"]
    assert "2.50 points" in m and "cross-layer equalization" in m and "bias correction" in m
    assert "per-channel" not in m  # the default config already is per-channel
    assert "quantization-aware" not in m  # only above 3 points
    cfg = dict(CONFIG, weights=dict(CONFIG["weights"], per_channel=False), cle=True)
    m = {a.rule: a.message for a in advise(Facts(config=cfg, degradation=4.0, metric="top1"))}
    assert "per-channel weights" in m["degradation"]
    assert "cross-layer" not in m["degradation"]
    assert "quantization-aware training" in m["degradation"]
    assert "degradation" not in names(Facts(config=CONFIG, degradation=2.0, metric="top1"))


def test_comparison_replaces_the_try_calibrators_tip():
    f = Facts(config=CONFIG, metric="top1", quantized=90.0, degradation=5.0)
    f.best_method = ("mse / per-channel", 94.0)
    (a,) = [a for a in advise(f) if a.rule == "try_calibrators"]
    assert "'mse / per-channel' better" in a.message
    f.best_method = ("minmax / per-channel", 90.0)  # the comparison found nothing better
    assert "try_calibrators" not in names(f)


def test_activations_left_in_float():
    wo = dict(CONFIG, activations=None)
    (a,) = [a for a in advise(Facts(config=wo, degradation=0.0)) if a.level == "warning"]
    assert a.rule == "quantize_activations" and "activations=None" in a.message
    f = Facts(config=CONFIG, degradation=0.0, float_activations={"input of fc": "never executed"})
    (a,) = advise(f)
    assert a.rule == "quantize_activations" and "input of fc" in a.message


def test_depthwise_per_tensor():
    f = Facts(config=CONFIG, degradation=0.0, depthwise_per_tensor=[f"dw{i}" for i in range(5)])
    (a,) = advise(f)
    assert a.rule == "per_channel_depthwise"
    assert "5 depthwise" in a.message and "dw0, dw1, dw2 and 2 more" in a.message


def test_clipping_and_representative_data():
    f = Facts(config=CONFIG, degradation=0.0, clipped={"relu1": 0.002, "relu2": 0.04})
    (a,) = advise(f)
    assert a.rule == "calibrator_clipping" and "relu2: 4.0%" in a.message
    assert "relu1" not in a.message
    f = Facts(
        config=CONFIG,
        degradation=0.0,
        clipped={"relu1": 0.0001, "relu2": 0.0},
        heldout_clipped={"relu1": 0.05, "relu2": 0.0005},
    )
    (a,) = advise(f)
    assert a.rule == "representative_data" and "relu1: 5.0%" in a.message


def test_evaluated_on_calibration_data():
    f = Facts(config=CONFIG, degradation=0.0, evaluated_on_calibration_data=True)
    (a,) = advise(f)
    assert a.rule == "validation_set" and a.level == "tip" and "--eval-data" in a.message


def test_warnings_come_before_tips_and_every_advice_names_its_practice():
    f = Facts(config=CONFIG, calibration_samples=10, metric="top1", degradation=5.0)
    out = advise(f)
    levels = [a.level for a in out]
    assert levels == sorted(levels, key=lambda v: v != "warning")
    assert all(a.practice == RULES[a.rule].practice for a in out)
    assert all(str(a).startswith(a.level) for a in out)


def test_registering_a_rule():
    @rule("test_tiny_model", "Test practice", level="tip")
    def _tiny(f: Facts) -> str | None:
        return "tiny" if f.calibration_samples == 7 else None

    try:
        assert "test_tiny_model" in names(Facts(calibration_samples=7))
        assert "test_tiny_model" not in names(Facts(calibration_samples=8))
    finally:
        del RULES["test_tiny_model"]
    with pytest.raises(ValueError):
        rule("bad", "x", level="error")


class _DepthwiseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.dw(self.relu(self.conv(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_gather_on_a_real_quantized_model():
    torch.manual_seed(0)
    model = _DepthwiseNet().eval()
    data = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    cfg = ptqkit.PTQConfig(weights=ptqkit.QuantSpec(per_channel=False), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = ptqkit.quantize(model, data, cfg)
        res = ptqkit.evaluate(model, q, data, "agreement", progress_bar=False)
    f = gather(q, res, clipped={"x": 0.5}, evaluated_on_calibration_data=True)
    assert f.calibration_samples == 24
    assert f.depthwise_per_tensor == ["dw"]
    assert f.metric == "agreement" and f.degradation == pytest.approx(100 - res.agreement)
    got = names(f)
    assert {"calibration_samples", "per_channel_depthwise", "calibrator_clipping"} <= got
    assert "validation_set" in got
    # per-channel weights: the depthwise rule is satisfied
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q2 = ptqkit.quantize(model, data, cfg.replace(weights=ptqkit.QuantSpec(per_channel=True)))
    assert gather(q2).depthwise_per_tensor == []


def test_thresholds_are_the_chapters():
    assert advice.MIN_CALIBRATION_SAMPLES == 100
    assert advice.MAX_DEGRADATION == 2.0


def test_what_tune_tried_is_not_suggested_again():
    tuned = {"calibration": ["mse", "percentile"], "cle": [True], "bias_correction": ["analytic"]}
    f = Facts(config=CONFIG, degradation=4.0, metric="agreement", tuned=tuned)
    m = {a.rule: a.message for a in advise(f)}
    assert "try_calibrators" not in m
    assert "another calibrator" not in m["degradation"] and "cross-layer" not in m["degradation"]
    assert "ptqkit.tune budget" in m["degradation"]
    untuned = {a.rule: a.message for a in advise(Facts(config=CONFIG, degradation=4.0,
                                                       metric="agreement"))}
    assert "try_calibrators" in untuned and "another calibrator" in untuned["degradation"]
