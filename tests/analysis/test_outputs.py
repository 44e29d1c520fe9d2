"""``ptqkit.evaluate`` on outputs that are not one float tensor: integer/bool predictions
(compared by equality) and tuples/dicts (an ``output=`` selector, or a clear error)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit import DataError


def _evaluate(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ptqkit.PTQWarning)
        return ptqkit.evaluate(*args, progress_bar=False, **kwargs)


class Fixed(nn.Module):
    """Returns precomputed outputs, batch after batch (``out(i)`` for batch ``i``)."""

    def __init__(self, outputs: list) -> None:
        super().__init__()
        self.outputs, self.i = outputs, 0

    def forward(self, x: torch.Tensor):
        out = self.outputs[self.i]
        self.i += 1
        return out


def test_integer_outputs_are_compared_by_equality():
    gen = torch.Generator().manual_seed(0)
    f = torch.randint(0, 10, (200,), generator=gen)
    q = f.clone()
    wrong = torch.randperm(200, generator=gen)[:62]
    q[wrong] = (q[wrong] + 1) % 10  # 62 of 200 predictions differ: 69 % agreement
    y = f.clone()
    y[:20] = (y[:20] + 3) % 10  # the float model is right on 180 of 200
    x = torch.zeros(200, 1)
    batches = [(x[:120], y[:120]), (x[120:], y[120:])]
    res = _evaluate(Fixed([f[:120], f[120:]]), Fixed([q[:120], q[120:]]), batches)
    assert res.agreement == pytest.approx(100 * 138 / 200)  # 69 %, not 100 %
    assert res.fp32 == pytest.approx(100 * 180 / 200)
    assert res.quantized == pytest.approx(100 * float((q == y).float().mean()))
    assert math.isnan(res.kl)
    agree = _evaluate(
        Fixed([f[:120], f[120:]]), Fixed([q[:120], q[120:]]), [x[:120], x[120:]], metric="agreement"
    )
    assert agree.quantized == pytest.approx(69.0) and agree.fp32 == 100.0


def test_argmax_model_agreement_matches_the_logits_one(digits_cnn, quantized_digits, test_batches):
    class Argmax(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x).argmax(1)

    ref = _evaluate(digits_cnn, quantized_digits, test_batches)
    res = _evaluate(Argmax(digits_cnn), Argmax(quantized_digits), test_batches)
    assert (res.fp32, res.quantized, res.agreement) == pytest.approx(
        (ref.fp32, ref.quantized, ref.agreement)
    )
    with pytest.raises(DataError, match="top5 needs class scores"):
        ptqkit.evaluate(Argmax(digits_cnn), Argmax(digits_cnn), test_batches, metric="top5")


def test_bool_masks_count_equal_elements():
    f = torch.zeros(4, 5, dtype=torch.bool)
    q = f.clone()
    q[0, :3] = True  # 3 of 20 elements differ
    res = _evaluate(Fixed([f]), Fixed([q]), [torch.zeros(4, 1)], metric="agreement")
    assert res.agreement == pytest.approx(100 * 17 / 20)


def test_float_and_integer_outputs_do_not_mix():
    with pytest.raises(DataError, match="batch 0"):
        _evaluate(Fixed([torch.zeros(3, 2)]), Fixed([torch.zeros(3, 2, dtype=torch.long)]),
                  [torch.zeros(3, 1)], metric="agreement")


def test_ambiguous_dict_and_tuple_outputs_list_their_entries(digits_cnn, test_batches):
    def two(x):
        return {"scores": digits_cnn(x), "features": x.flatten(1)}

    with pytest.raises(DataError, match=r"'scores': tensor \(120, 10\).*'features'.*output="):
        ptqkit.evaluate(two, two, test_batches, progress_bar=False)

    def pair(x):
        return digits_cnn(x).relu(), digits_cnn(x)

    with pytest.raises(DataError, match=r"0: tensor \(120, 10\) float32, 1: .*output=0"):
        ptqkit.evaluate(pair, pair, test_batches, progress_bar=False)


def test_output_selector_by_key_index_and_callable(digits_cnn, quantized_digits, test_batches):
    ref = _evaluate(digits_cnn, quantized_digits, test_batches)

    def as_dict(m):
        return lambda x: {"features": x.flatten(1), "scores": m(x)}

    def as_tuple(m):
        return lambda x: (x.flatten(1), m(x))

    by_key = _evaluate(as_dict(digits_cnn), as_dict(quantized_digits), test_batches,
                       output="scores")
    by_index = _evaluate(as_tuple(digits_cnn), as_tuple(quantized_digits), test_batches, output=1)
    by_fn = _evaluate(as_tuple(digits_cnn), as_tuple(quantized_digits), test_batches,
                      output=lambda out: out[1])
    for res in (by_key, by_index, by_fn):
        assert (res.fp32, res.quantized, res.agreement, res.kl) == pytest.approx(
            (ref.fp32, ref.quantized, ref.agreement, ref.kl)
        )
    with pytest.raises(DataError, match=r"output='logits' cannot be taken.*'features', 'scores'"):
        ptqkit.evaluate(as_dict(digits_cnn), as_dict(digits_cnn), test_batches, output="logits")
