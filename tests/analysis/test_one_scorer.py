"""One scorer (ptqkit.scorer): evaluate, sensitivity, the float fallback and tune's held-out
score select the same output and compare it the same way, so they give the same verdict on
the same model and data; integer outputs (an argmax) are compared by equality everywhere."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.correct.fallback import fallback
from ptqkit.info import PTQInfo
from ptqkit.recipe.holdout import HoldOut

CFG = ptqkit.PTQConfig(weights=ptqkit.QuantSpec(bits=3), progress=False)


class Argmax(nn.Module):
    """A classifier that returns its predicted classes (int64), not its scores."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).argmax(1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 6)).eval()


def _data(labels: bool = False) -> list:
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(32, 12, generator=gen) for _ in range(4)]
    if not labels:
        return xs
    return [(x, torch.randint(0, 6, (32,), generator=gen)) for x in xs]


def _scores(model: nn.Module, data: list, metric: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ptqkit.PTQWarning)
        q = ptqkit.quantize(model, data, CFG)
        res = ptqkit.evaluate(model, q, data, metric=metric, progress_bar=False)
        sens = ptqkit.sensitivity(q, data, CFG)
        info = PTQInfo()
        fallback(copy.deepcopy(q), data, CFG.replace(max_degradation=100.0), info)
        held = HoldOut(model, data, "auto").score(q)
    return q, res, sens, info.details["fallback"], held


def _by_hand(model: nn.Module, q: nn.Module, data: list) -> float:
    x = torch.cat([b[0] if isinstance(b, tuple) else b for b in data])
    with torch.no_grad():
        f, g = model(x), q(x)
    same = f == g if not f.is_floating_point() else f.argmax(1) == g.argmax(1)
    return 100.0 * same.double().mean().item()


def test_argmax_output_is_compared_by_equality_by_every_scorer():
    model = Argmax(_net())
    q, res, sens, fb, held = _scores(model, _data(), "agreement")
    agreement = _by_hand(model, q, _data())
    assert res.agreement == pytest.approx(agreement)
    # sensitivity scored the SQNR of the class indices (24 dB) before: now the agreement
    assert sens.metric == "agreement" and sens.quant_metric == pytest.approx(agreement)
    assert fb["target"]["metric"] == "agreement"
    assert fb["before"]["agreement"] == pytest.approx(agreement, abs=1e-3)
    assert held.agreement == pytest.approx(agreement) and held.sqnr_db is None
    assert all(r.out_sqnr_only_float_db != r.out_sqnr_only_float_db for r in sens.layers)  # nan


def test_logits_give_the_same_agreement_kl_and_sqnr_everywhere():
    model = _net()
    q, res, sens, fb, held = _scores(model, _data(), "agreement")
    agreement = _by_hand(model, q, _data())
    assert res.agreement == pytest.approx(agreement)
    assert sens.metric == "agreement" and sens.quant_metric == pytest.approx(agreement)
    assert fb["before"]["agreement"] == pytest.approx(agreement, abs=1e-3)
    assert held.agreement == pytest.approx(agreement)
    assert held.kl == pytest.approx(res.kl, rel=1e-9)
    assert held.sqnr_db == pytest.approx(sens.quant_sqnr_db, rel=1e-9)
    assert fb["before"]["sqnr_db"] == pytest.approx(sens.quant_sqnr_db, abs=1e-3)


def test_labels_give_the_same_accuracy_in_evaluate_sensitivity_and_fallback():
    data = _data(labels=True)
    for model in (_net(), Argmax(_net())):
        _, res, sens, fb, _ = _scores(model, data, "top1")
        assert sens.metric == "accuracy" and fb["target"]["metric"] == "accuracy"
        assert sens.quant_metric == pytest.approx(res.quantized)
        assert sens.float_metric == pytest.approx(res.fp32)
        assert fb["before"]["accuracy"] == pytest.approx(res.quantized, abs=1e-3)


def test_the_same_tensor_of_a_tuple_output_is_scored():
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x):
            return {"aux": None, "logits": self.net(x)}

    model = Pair().eval()
    _, res, sens, fb, held = _scores(model, _data(), "agreement")
    assert sens.quant_metric == pytest.approx(res.agreement)
    assert fb["before"]["agreement"] == pytest.approx(res.agreement, abs=1e-3)
    assert held.agreement == pytest.approx(res.agreement) and held.kl == pytest.approx(res.kl)


def test_an_ambiguous_output_is_refused_by_the_fallback_in_its_own_words():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x):
            y = self.net(x)
            return y, 2 * y  # first_tensor used to score the first one without a word

    with pytest.raises(ptqkit.DataError, match="float fallback"):
        ptqkit.quantize(Two().eval(), _data(), CFG.replace(max_degradation=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ptqkit.PTQWarning)
        q = ptqkit.quantize(Two().eval(), _data(), CFG)
    with pytest.raises(ptqkit.DataError, match=r"sensitivity\(\.\.\., output=0\)"):
        ptqkit.sensitivity(q, _data(), CFG)
    rep = ptqkit.sensitivity(q, _data(), CFG, output=1)
    assert rep.metric == "agreement"
