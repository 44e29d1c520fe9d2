"""evaluate refuses what would be reported wrong: its arguments swapped (the quantized model as
the float reference) and says loudly when non-finite values (NaN/Inf) reach the scores."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.scorer import compare, nonfinite_message

CFG = ptqkit.PTQConfig(progress=False)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _data() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(16, 8, generator=gen) for _ in range(4)]


def _quantized(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ptqkit.PTQWarning)
        return ptqkit.quantize(model, _data(), CFG)


def _evaluate(*args, **kwargs):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = ptqkit.evaluate(*args, progress_bar=False, metric="agreement", **kwargs)
    return res, [str(w.message) for w in seen if issubclass(w.category, ptqkit.PTQWarning)]


def test_swapped_arguments_are_refused():
    model = _net()
    q = _quantized(model)
    with pytest.raises(ptqkit.ConfigError, match="arguments look swapped"):
        ptqkit.evaluate(q, model, _data(), metric="agreement", progress_bar=False)
    with pytest.raises(ptqkit.ConfigError, match="both models hold ptqkit's quantized"):
        ptqkit.evaluate(q, _quantized(_net()), _data(), metric="agreement", progress_bar=False)
    res, _ = _evaluate(model, q, _data())  # the right order still works
    assert res.samples == 64 and res.compression is not None and res.compression > 1


def test_a_nan_in_the_evaluation_data_is_left_out_and_said():
    model = _net()
    q = _quantized(model)
    data = _data()
    data[1][3, 2] = float("nan")
    res, said = _evaluate(model, q, data)
    assert res.samples == 63 and math.isfinite(res.kl)  # was: 64 samples, KL nan, no word
    assert any("1 sample(s) have NaN/Inf in their input" in m for m in said)
    assert any("1 sample(s) have NaN/Inf" in m for m in res.warnings)
    clean = [torch.cat([d[:3], d[4:]]) if i == 1 else d for i, d in enumerate(data)]
    ref, _ = _evaluate(model, q, clean)  # the same as evaluating without that sample
    assert res.agreement == pytest.approx(ref.agreement) and res.kl == pytest.approx(ref.kl)


def test_an_inf_float_model_is_an_error_naming_the_float_model():
    model = _net()
    with torch.no_grad():
        model[2].bias[1] = float("inf")
    q = _quantized(model)
    with pytest.raises(ptqkit.ModelError, match="float model itself returns NaN/Inf on 64"):
        ptqkit.evaluate(model, q, _data(), metric="agreement", progress_bar=False)


class Broken(nn.Module):
    """Returns the wrapped model's output with NaN in the rows listed (a failing copy)."""

    def __init__(self, model: nn.Module, rows: list[int]) -> None:
        super().__init__()
        self.model, self.rows = model, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x).clone()
        y[self.rows] = float("nan")
        return y


def test_nan_in_the_quantized_output_counts_as_wrong():
    model = _net()
    res, said = _evaluate(model, Broken(model, [0, 5]), _data())
    assert res.samples == 64 and res.agreement == pytest.approx(100.0 * 56 / 64)
    assert res.kl == math.inf
    assert any("quantized model returns NaN/Inf on 8 sample(s)" in m for m in said)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ptqkit.PTQWarning)
        labeled = [(x, model(x).argmax(1)) for x in _data()]
        top1 = ptqkit.evaluate(model, Broken(model, [0]), labeled, progress_bar=False)
    assert top1.fp32 == 100.0 and top1.quantized == pytest.approx(100.0 * 60 / 64)


def test_compare_by_hand():
    f = torch.tensor([[1.0, 2.0], [float("inf"), 0.0], [3.0, 1.0], [0.0, 1.0]])
    q = torch.tensor([[1.0, 2.5], [1.0, 0.0], [float("nan"), 1.0], [1.0, 0.0]])
    x = torch.tensor([[0.0], [0.0], [0.0], [float("nan")]])
    p = compare(f, q, 4, (x,))
    assert (p.bad_input, p.bad_float, p.bad_quant) == (1, 1, 1)
    assert p.keep.tolist() == [True, False, True, False]
    assert p.samples == 2 and p.agree == 1.0 and p.kl == math.inf and p.noise == math.inf
    assert p.hits.tolist() == [True, False]
    assert nonfinite_message(0, 0, 0, 4) is None


def test_quantize_says_when_the_float_model_is_already_non_finite():
    model = _net()
    with torch.no_grad():
        model[2].bias[1] = float("inf")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        q = ptqkit.quantize(model, _data(), CFG)
    said = [str(w.message) for w in seen if "float model itself returns NaN/Inf" in str(w.message)]
    # (the capture check runs the first 8 samples of the first batch, and says so)
    assert said and "its first 8 samples, checked) (output: 8 of 8 rows)" in said[0]
    assert any("float model itself" in w for w in q.ptq_info.warnings)
    with torch.no_grad():  # the copy computes what the model computes, Inf included
        x = _data()[0]
        assert torch.equal(torch.isinf(q(x)), torch.isinf(model(x)))


def test_compare_refuses_a_quantized_model_before_running_any_method():
    from ptqkit.compare import compare

    q = _quantized(_net())
    with pytest.raises(ptqkit.ModelError, match=r"compare\(model, \.\.\.\) needs the float"):
        compare(q, _data(), progress_bar=False)
