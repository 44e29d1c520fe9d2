"""The scorer's expected top-1 cost (ptqkit/scorer.py): exact values against a direct numpy
computation, probabilities given as outputs, non-finite quantized rows, and evaluate's advice for
the agreement metric judged on it (a class changed where the float model hesitates costs little;
one changed where it is sure costs what the float model believed)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import ptqkit
from ptqkit.scorer import compare


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_expected_cost_is_the_float_probability_lost_per_changed_row() -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(64, 10, generator=g) * 3
    q = f.clone()
    q[:8] = q[:8].flip(1)  # eight rows change class
    pair = compare(f, q, 64)
    p = _softmax(f.double().numpy())
    cf, cq = p.argmax(1), q.double().numpy().argmax(1)
    want = (p[np.arange(64), cf] - p[np.arange(64), cq]).sum()
    assert pair.cost == pytest.approx(want, rel=1e-12)
    assert want > 0 and (cf != cq).sum() >= 1
    same = compare(f, f.clone(), 64)
    assert same.cost == 0.0


def test_rows_that_are_already_probabilities_are_used_as_they_are() -> None:
    f = torch.tensor([[0.7, 0.3], [0.1, 0.9]])
    q = torch.tensor([[0.4, 0.6], [0.2, 0.8]])
    assert compare(f, q, 2).cost == pytest.approx(0.7 - 0.3)
    logits = torch.log(f)  # log-probabilities: their softmax is the same distribution
    assert compare(logits, torch.log(q), 2).cost == pytest.approx(0.4)


def test_a_non_finite_quantized_row_costs_the_float_models_confidence() -> None:
    f = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[float("nan"), 0.0], [0.0, 1.0]])
    p0 = float(torch.softmax(f[0].double(), 0)[0])
    assert compare(f, q, 2).cost == pytest.approx(p0)


def _models(changed: torch.Tensor, table: torch.Tensor):
    def fp32(i: torch.Tensor) -> torch.Tensor:
        return table[i]

    def quant(i: torch.Tensor) -> torch.Tensor:
        out = table[i].clone()
        flip = changed[i]
        out[flip] = out[flip].flip(1)
        return out

    return fp32, quant


def _run(changed: torch.Tensor, table: torch.Tensor) -> tuple[ptqkit.EvalResult, list[str]]:
    fp32, quant = _models(changed, table)
    data = [torch.arange(s, s + 50) for s in range(0, 200, 50)]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = ptqkit.evaluate(fp32, quant, data, metric="agreement", progress_bar=False)
    return res, [str(x.message) for x in w]


def test_agreement_advice_is_judged_on_the_expected_cost() -> None:
    n = 200
    table = torch.zeros(n, 2)
    table[:, 0] = torch.linspace(0.001, 0.01, n)  # the float model hesitates on every sample
    changed = torch.zeros(n, dtype=torch.bool)
    changed[:10] = True  # 5 % of the classes change
    res, msgs = _run(changed, table)
    assert res.degradation == pytest.approx(5.0)
    p = torch.softmax(table[:10].double(), 1)
    assert res.expected_cost == pytest.approx(100 * float((p[:, 0] - p[:, 1]).sum()) / n)
    assert res.expected_cost < 0.01
    assert not [m for m in msgs if "quantization costs" in m]

    table[:, 0] = 8.0  # now the float model is sure of its class: each change costs ~1
    res, msgs = _run(changed, table)
    assert res.degradation == pytest.approx(5.0)
    assert res.expected_cost == pytest.approx(5.0, rel=1e-3)
    costs = [m for m in msgs if "quantization costs" in m]
    assert costs and "expected 5.00 points of top-1 accuracy" in costs[0]
    assert "agreement lost 5.00 points" in costs[0]
