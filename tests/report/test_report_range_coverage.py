"""The report's calibration-coverage section, from ``EvalResult.coverage``."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import ptqkit
from ptqkit.report.html import render
from ptqkit.report.measure import collect


def _model_and_data() -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    gen = torch.Generator().manual_seed(0)
    calib = list(torch.randn(512, 16, generator=gen).split(128))
    evald = list(torch.randn(512, 16, generator=gen).split(128))
    return model, calib, evald


def _report(model, calib, evald, scale: float) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = ptqkit.quantize(model, [scale * x for x in calib], ptqkit.PTQConfig(progress=False))
        res = ptqkit.evaluate(model, q, evald, metric="agreement", progress_bar=False)
    rep = collect(q, result=res)
    return rep, render(rep)


def test_report_shows_the_saturated_quantizers_and_the_advice():
    model, calib, evald = _model_and_data()
    rep, page = _report(model, calib, evald, 0.5)  # calibrated on half the scale
    assert "Calibration coverage of the evaluation data" in page and 'id="coverage"' in page
    saturated = [c.label for c in rep.coverage.values() if c.saturated]
    assert saturated and all(label in page for label in saturated)
    assert any(a.rule == "calibration_coverage" for a in rep.advice)
    assert "does not represent the evaluation data" in page

    rep, page = _report(model, calib, evald, 1.0)
    assert "0 of " in page and not any(a.rule == "calibration_coverage" for a in rep.advice)
