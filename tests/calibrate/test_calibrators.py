"""Calibrators (:mod:`ptqkit.calibrate.calibrators`): streaming/merge invariants, error
handling, degenerate data and per-channel ranges, for every registered calibrator. The solvers
against slow reference implementations: ``test_solvers.py``."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _calib import (
    ASYM,
    NAMES,
    ORDER_FREE,
    SYM,
    dist,
    make,
    observed,
    spec_for,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from ptqkit.calibrate import make_calibrator
from ptqkit.config import QuantSpec
from ptqkit.errors import CalibrationError, ConfigError
from ptqkit.quant import fake_quant, qparams


@st.composite
def streams(draw):
    """A data set and a random split of a random permutation of it into batches."""
    n = draw(st.integers(2, 2000))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "relu", "shifted", "outliers", "zeros"]))
    x = torch.randn(n, generator=g) * 10.0 ** draw(st.integers(-4, 4))
    if kind == "relu":
        x = x.relu()
    elif kind == "shifted":
        x = x + 3 * x.abs().max()
    elif kind == "outliers":
        x[: max(1, n // 500)] *= 1000
    elif kind == "zeros":
        x[torch.rand(n, generator=g) < 0.5] = 0.0
    cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=6))))
    perm = torch.randperm(n, generator=g)
    return x, list(torch.tensor_split(x[perm], cuts))


# -- streaming invariants -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ORDER_FREE)
@settings(max_examples=12, deadline=None, derandomize=True)
@given(data=streams())
def test_batch_split_invariance_is_exact(name, data):
    """Exact for minmax and the histogram calibrators: the statistics are exact, so is the range."""
    x, batches = data
    one, many = observed(name, [x]), observed(name, batches)
    for spec in (SYM, ASYM):
        a, b = one.compute_range(spec), many.compute_range(spec)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (spec, a, b)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=10, deadline=None, derandomize=True)
@given(data=streams(), where=st.floats(0, 1))
def test_merge_of_two_halves_equals_one_calibrator_on_all(name, data, where):
    """``a.merge(b)`` is the calibrator that saw ``a``'s batches then ``b``'s: exact for the
    order-free calibrators, up to float rounding for ema."""
    _, batches = data
    k = round(where * len(batches))
    a, b = observed(name, batches[:k]), observed(name, batches[k:])
    a.merge(b)
    ref = observed(name, batches)
    for spec in (SYM, ASYM):
        got, want = a.compute_range(spec), ref.compute_range(spec)
        if name == "ema":
            for g_, w_ in zip(got, want):
                assert float(g_) == pytest.approx(float(w_), rel=1e-5, abs=1e-30)
        else:
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    vals=st.lists(st.tuples(st.floats(-10, 0), st.floats(0, 10)), min_size=1, max_size=12),
    cuts=st.lists(st.integers(0, 12), max_size=3),
    momentum=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
)
def test_ema_merge_equals_sequential_observation(vals, cuts, momentum):
    """ema is order dependent by definition (a moving average of per-batch min/max); merging
    calibrators that saw consecutive runs of batches equals observing them in that order."""
    batches = [torch.tensor([lo, hi]) for lo, hi in vals]
    # the definition: m_1 = v_1, m_t = β m_{t-1} + (1 - β) v_t
    m = list(vals[0])
    for lo, hi in vals[1:]:
        m = [momentum * m[0] + (1 - momentum) * lo, momentum * m[1] + (1 - momentum) * hi]
    seq = observed("ema", batches, momentum=momentum)
    lo, hi = seq.compute_range(SYM)
    assert float(lo) == pytest.approx(m[0], abs=1e-5) and float(hi) == pytest.approx(m[1], abs=1e-5)
    bounds = [0, *sorted(min(c, len(batches)) for c in cuts), len(batches)]
    parts = [
        observed("ema", batches[i:j], momentum=momentum) for i, j in itertools.pairwise(bounds)
    ]
    acc = parts[0]
    for p in parts[1:]:
        acc.merge(p)
    got = acc.compute_range(SYM)
    assert float(got[0]) == pytest.approx(m[0], abs=1e-5)
    assert float(got[1]) == pytest.approx(m[1], abs=1e-5)


def test_ema_depends_on_the_order():
    small, big = torch.tensor([-1.0, 1.0]), torch.tensor([-5.0, 5.0])
    a = observed("ema", [small, big]).compute_range(SYM)
    b = observed("ema", [big, small]).compute_range(SYM)
    assert float(a[1]) == pytest.approx(0.9 * 1 + 0.1 * 5)
    assert float(b[1]) == pytest.approx(0.9 * 5 + 0.1 * 1)


@pytest.mark.parametrize("name", NAMES)
def test_merge_with_empty_calibrators(name):
    x = dist("gaussian")[:5000]
    a = observed(name, [x])
    a.merge(make(name, bins=512))
    b = make(name, bins=512)
    b.merge(observed(name, [x]))
    want = observed(name, [x]).compute_range(ASYM)
    for cal in (a, b):
        got = cal.compute_range(ASYM)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_compute_range_before_data_raises(name):
    cal = make(name)
    with pytest.raises(CalibrationError, match=rf"^{name}: .*before any data"):
        cal.compute_range(SYM)
    cal.observe(torch.empty(0))  # an empty batch is not data
    with pytest.raises(CalibrationError, match=name):
        cal.compute_range(ASYM)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("axis", [None, 1])
def test_non_finite_batch_raises_naming_the_calibrator(name, bad, axis):
    g = torch.Generator().manual_seed(0)
    good = torch.randn(4, 3, 10, generator=g)
    cal = observed(name, [good], axis=axis)
    x = torch.randn(4, 3, 10, generator=g)
    x[1, 2, 3] = bad
    with pytest.raises(CalibrationError, match=rf"^{name}: .*NaN or Inf"):
        cal.observe(x)
    # the bad batch left no trace
    spec = spec_for(False, axis)
    got, want = cal.compute_range(spec), observed(name, [good], axis=axis).compute_range(spec)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("name", NAMES)
def test_spec_must_match_the_observed_granularity(name):
    cal = observed(name, [torch.randn(3, 5, generator=torch.Generator().manual_seed(1))])
    with pytest.raises(ConfigError, match="axis"):
        cal.compute_range(QuantSpec(per_channel=True, axis=0))
    pc = observed(name, [torch.randn(3, 5, generator=torch.Generator().manual_seed(2))], axis=0)
    with pytest.raises(ConfigError, match="axis"):
        pc.compute_range(QuantSpec())
    with pytest.raises(ConfigError, match="axis"):
        pc.compute_range(QuantSpec(per_channel=True, axis=1))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("percentile", {"percentile": -1.0}),
        ("percentile", {"percentile": 0}),
        ("percentile", {"percentile": 50}),
        ("percentile", {"percentile": 100.01}),
        ("percentile", {"percentile": "99.9"}),
        ("percentile", {"bins": 0}),
        ("kl", {"bins": 0}),
        ("kl", {"bins": 7}),
        ("mse", {"bins": -4096}),
        ("mse", {"bins": 2048.0}),
        ("auto_percentile", {"bins": True}),
        ("auto_percentile", {"candidates": ()}),
        ("auto_percentile", {"candidates": (99.0, 101.0)}),
        ("auto_percentile", {"candidates": (-5,)}),
        ("ema", {"momentum": -0.1}),
        ("ema", {"momentum": 1.0}),
        ("ema", {"momentum": 1.5}),
        ("ema", {"momentum": "0.9"}),
        ("minmax", {"axis": "0"}),
        ("kl", {"axis": 1.0}),
        ("minmax", {"bins": 512}),  # not an option of minmax
        ("kl", {"percentile": 99.0}),
    ],
    ids=repr,
)
def test_bad_constructor_arguments_are_rejected(name, kwargs):
    with pytest.raises(ConfigError, match=name):
        make_calibrator(name, **kwargs)


def test_unknown_calibrator_name():
    with pytest.raises(ConfigError, match="registered"):
        make_calibrator("entropy")


# -- degenerate data ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", [0.0, 3.0, -2.5, 1e-20, 7e5])
@pytest.mark.parametrize("spec", [SYM, ASYM, QuantSpec(bits=4, symmetric=False)], ids=str)
def test_constant_input_gives_a_valid_range(name, value, spec):
    x = torch.full((64,), value)
    lo, hi = observed(name, [x, x]).compute_range(spec)
    assert lo.shape == hi.shape == ()
    assert math.isfinite(float(lo)) and math.isfinite(float(hi)) and float(lo) <= float(hi)
    scale, zp = qparams(lo, hi, spec)  # valid: no CalibrationError
    assert float(scale) > 0
    # the constant is reproduced within half a step (an exact 0 exactly)
    err = (fake_quant(x, scale, zp, spec) - x).abs().max()
    assert float(err) <= 0.5 * float(scale) * (1 + 1e-5) + 1e-6 * abs(value)
    if value == 0.0:
        assert float(err) == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_all_zero_channel_gives_a_valid_per_channel_range(name):
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    x[:, 2] = 0.0
    spec = spec_for(False, 1)
    lo, hi = observed(name, [x[:3], x[3:]], axis=1).compute_range(spec)
    assert float(lo[2]) == float(hi[2]) == 0.0
    scale, zp = qparams(lo, hi, spec)
    assert bool((scale > 0).all()) and torch.isfinite(fake_quant(x, scale, zp, spec)).all()


# -- per-channel ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_shapes_and_values(name, axis, symmetric):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 16, 4, generator=g) * torch.linspace(0.1, 10, 4)
    x[1] = x[1].relu()
    batches = [x[:, :, :9], x[:, :, 9:]]  # split along an axis that is never the channel one
    spec = spec_for(symmetric, axis)
    lo, hi = observed(name, batches, axis=axis).compute_range(spec)
    c = x.shape[axis]
    assert lo.shape == hi.shape == (c,) and lo.dtype == hi.dtype == torch.float32
    assert bool((lo <= hi).all())
    # channel c is calibrated as a per-tensor calibrator on that channel alone would be
    pt = spec_for(symmetric, None)
    for i in range(c):
        parts = [b.select(axis, i) for b in batches]
        want = observed(name, parts).compute_range(pt)
        assert float(lo[i]) == float(want[0]) and float(hi[i]) == float(want[1]), (i, want)
    assert observed(name, batches).compute_range(pt)[0].shape == ()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("spec_kind", ["sym", "asym", "asym4"])
def test_per_channel_mixes_one_sided_and_two_sided_channels(name, spec_kind):
    """Each channel is solved on its own data: a one-sided channel gets the unsigned-grid search
    even when the other channels are two-sided, and a narrow channel is not searched over the
    widest channel's bins."""
    g = torch.Generator().manual_seed(11)
    n = 3000
    x = torch.stack(
        [
            torch.randn(n, generator=g),
            torch.randn(n, generator=g).relu(),
            -torch.rand(n, generator=g) * 3,
            torch.randn(n, generator=g) * 100,
            torch.zeros(n),
            5 + torch.rand(n, generator=g),
        ],
        dim=1,
    )  # channels along axis 1
    bits, symmetric = {"sym": (8, True), "asym": (8, False), "asym4": (4, False)}[spec_kind]
    spec = QuantSpec(bits=bits, symmetric=symmetric, per_channel=True, axis=1)
    lo, hi = observed(name, [x[:1000], x[1000:]], axis=1, bins=1024).compute_range(spec)
    for c in range(x.shape[1]):
        pt = QuantSpec(bits=bits, symmetric=symmetric)
        want = observed(name, [x[:1000, c], x[1000:, c]], bins=1024).compute_range(pt)
        assert (float(lo[c]), float(hi[c])) == (float(want[0]), float(want[1])), c
