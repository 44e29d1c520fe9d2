"""Exactness of the mergeable histogram statistics (:class:`ptqkit.calibrate.HistogramStats`):
the state after a stream is a function of the multiset of values only (batch split, order,
merge tree), bounded in size, and equal to the histogram computed directly from the data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptqkit.calibrate import HistogramStats, MinMaxStats
from ptqkit.calibrate.stats import as_channels
from ptqkit.errors import CalibrationError

FAST = settings(max_examples=30, deadline=None, derandomize=True)


def _state(h: HistogramStats) -> dict[str, torch.Tensor]:
    return {
        "counts": h.counts,
        "exp": h.exp,
        "off": h.off,
        "zeros": h.zeros,
        "lo": h.lo,
        "hi": h.hi,
    }


def assert_same_state(a: HistogramStats, b: HistogramStats) -> None:
    sa, sb = _state(a), _state(b)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def _stream(chunks, bins=256, axis=None) -> HistogramStats:
    h = HistogramStats(bins, axis)
    for c in chunks:
        h.update(c)
    return h


@st.composite
def datasets(draw, min_size=1, max_size=3000):
    """float32 data of a random shape of distribution, scale and offset (no subnormals)."""
    n = draw(st.integers(min_size, max_size))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "relu", "laplace", "t2", "int", "offset", "sparse"]))
    scale = 10.0 ** draw(st.integers(-6, 6))
    if kind == "normal":
        x = torch.randn(n, generator=g)
    elif kind == "relu":
        x = torch.randn(n, generator=g).relu()
    elif kind == "laplace":
        u = torch.rand(n, generator=g) - 0.5
        x = -u.sign() * torch.log1p(-2 * u.abs())
    elif kind == "t2":
        z = torch.randn(n, generator=g)
        chi2 = torch.randn(n, 2, generator=g).pow(2).sum(1)
        x = z / (chi2 / 2).sqrt()
    elif kind == "int":
        x = torch.randint(-5, 6, (n,), generator=g).float()
    elif kind == "offset":  # far from zero, narrow
        x = 100.0 + torch.rand(n, generator=g)
    else:
        x = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.1)
    return (x * scale).float()


def _split(x: torch.Tensor, draw_cuts: list[int], perm: torch.Tensor | None = None):
    if perm is not None:
        x = x[perm]
    cuts = sorted({min(max(c, 0), x.numel()) for c in draw_cuts})
    return [p for p in torch.tensor_split(x, cuts) if p.numel() > 0]


# -- split / order / merge invariance -------------------------------------------------------------


@FAST
@given(x=datasets(), cuts=st.lists(st.integers(0, 3000), max_size=8), seed=st.integers(0, 1000))
def test_batch_split_and_permutation_invariance_is_exact(x, cuts, seed):
    one = _stream([x])
    perm = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed))
    many = _stream(_split(x, cuts, perm))
    assert_same_state(one, many)
    assert float(one.counts.sum()) == x.numel()


@FAST
@given(
    x=datasets(min_size=2),
    cuts=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    seed=st.integers(0, 1000),
)
def test_merge_equals_single_pass(x, cuts, seed):
    one = _stream([x])
    parts = [_stream([p]) for p in _split(x, cuts)]
    rng = np.random.default_rng(seed)
    # merge in a random tree: pick two, merge one into the other, until one is left
    while len(parts) > 1:
        i, j = rng.choice(len(parts), 2, replace=False)
        parts[i].merge(parts[j])
        parts.pop(j)
    assert_same_state(one, parts[0])


def test_merge_with_empty_statistics():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    a = _stream([x])
    a.merge(HistogramStats(256))  # merging nothing changes nothing
    assert_same_state(a, _stream([x]))
    b = HistogramStats(256)
    b.merge(_stream([x]))  # merging into an empty statistic copies
    assert_same_state(b, _stream([x]))
    with pytest.raises(CalibrationError, match="bins"):
        b.merge(_stream([x], bins=128))


def test_default_bins_split_invariance():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50_000, generator=g), 40 * torch.randn(50, generator=g)])
    one = _stream([x], bins=4096)
    perm = torch.randperm(x.numel(), generator=g)
    assert_same_state(one, _stream(torch.split(x[perm], 777), bins=4096))


# -- special data ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, 5.0, -5.0, 1e-30, 3e38, -1e-3])
def test_constant_tensor(value):
    value = float(np.float32(value))
    h = _stream([torch.full((100,), value)] * 3)
    assert float(h.counts.sum()) == 300
    assert int((h.counts > 0).sum()) == 1
    edges = h.edges()[0]
    j = int(torch.nonzero(h.counts[0])[0])
    assert float(edges[j]) <= value < float(edges[j + 1])
    assert float(h.zeros[0]) == (300 if value == 0 else 0)
    folded, w = h.folded()
    assert folded.shape[1] <= h.nbins  # bounded, however far from 0 the constant is
    assert float(folded.sum()) == 300
    k = int(torch.nonzero(folded[0])[0])
    assert float(k * w[0]) <= abs(value) <= float((k + 1) * w[0])


def test_all_zero_then_non_zero_data():
    g = torch.Generator().manual_seed(3)
    zeros, data = torch.zeros(500), torch.randn(2000, generator=g)
    h = _stream([zeros, zeros, data])
    assert_same_state(h, _stream([torch.cat([zeros, zeros, data])]))
    assert float(h.zeros[0]) == 1000
    assert float(h.counts.sum()) == 3000
    assert float(h.lo[0]) == float(data.min()) and float(h.hi[0]) == 0.0 + float(data.max())
    # and the reverse order
    assert_same_state(h, _stream([data, zeros, zeros]))


def test_growth_by_many_orders_of_magnitude():
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(200, generator=g) * 10.0**e for e in range(-30, 31, 3)]
    h = _stream(batches, bins=512)
    assert_same_state(h, _stream([torch.cat(batches)], bins=512))
    assert_same_state(h, _stream(batches[::-1], bins=512))
    assert float(h.counts.sum()) == 200 * len(batches)
    used = torch.nonzero(h.counts[0]).flatten()
    assert int(used.max() - used.min()) < h.nbins
    _check_direct_histogram(h, torch.cat(batches).reshape(1, -1))


def test_tiny_negative_values_next_to_a_huge_range_stay_negative():
    """``x · 2^-e`` underflows to -0.0 for x = -1e-38 at a bin width of 2^27: the value must
    still land in the bin below 0, as it does when it is binned at a finer width first."""
    x = torch.tensor([-1e-38, -1e-30, 3e-39, 0.0, 1e10, -1e10])
    one = _stream([x])
    assert float(one.exp[0]) > 20
    _check_direct_histogram(one, x.reshape(1, -1))
    assert_same_state(one, _stream([x[:4], x[4:]]))
    assert_same_state(one, _stream([x[i : i + 1] for i in range(6)]))


def _check_direct_histogram(h: HistogramStats, rows: torch.Tensor) -> None:
    """``counts`` is the histogram of the data at the final grid, computed directly in float64."""
    w = h.width().numpy()
    for c in range(rows.shape[0]):
        x = rows[c].double().numpy()
        idx = np.floor(x / w[c]).astype(np.int64) - int(h.off[c])  # x / 2^e is exact
        assert idx.min() >= 0 and idx.max() < h.nbins
        direct = np.bincount(idx, minlength=h.nbins)
        np.testing.assert_array_equal(h.counts[c].numpy(), direct)


@FAST
@given(x=datasets(), cuts=st.lists(st.integers(0, 3000), max_size=5))
def test_counts_equal_the_direct_histogram_at_the_final_width(x, cuts):
    h = _stream(_split(x, cuts))
    _check_direct_histogram(h, x.reshape(1, -1))
    assert float(h.zeros[0]) == float((x == 0).sum())
    # the data fills between half and all of the bins (or one bin for a constant)
    used = torch.nonzero(h.counts[0]).flatten()
    span = int(used.max() - used.min()) + 1
    assert span <= h.nbins
    if float(x.max()) > float(x.min()):
        assert span >= h.nbins // 2 - 1


# -- per-channel ----------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_equals_per_tensor_on_each_channel(axis):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 50, generator=g) * torch.tensor([1e-3, 1.0, 1e3]).reshape(1, 3, 1)
    x[:, 0] = x[:, 0].abs()  # a one-sided channel along axis 1
    x[0] = 0.0  # an all-zero channel along axis 0
    batches = [x[..., :20], x[..., 20:]] if axis != -1 else [x[:2], x[2:]]
    h = _stream(batches, bins=128, axis=axis)
    n_ch = x.shape[axis]
    assert h.counts.shape == (n_ch, 128)
    assert h.exp.shape == h.off.shape == h.zeros.shape == h.lo.shape == (n_ch,)
    for c in range(n_ch):
        ref = _stream([x.select(axis, c)], bins=128)
        for k in ("counts", "exp", "off", "zeros", "lo", "hi"):
            assert torch.equal(_state(h)[k][c], _state(ref)[k][0]), (c, k)
    _check_direct_histogram(h, as_channels(x, axis))


def test_per_channel_count_must_not_change():
    h = HistogramStats(64, axis=0)
    h.update(torch.randn(3, 10, generator=torch.Generator().manual_seed(2)))
    with pytest.raises(CalibrationError, match="channels"):
        h.update(torch.randn(4, 10, generator=torch.Generator().manual_seed(3)))


def test_bad_arguments():
    for bins in (0, 7, 2.5, True, "64"):
        with pytest.raises(CalibrationError, match="bins"):
            HistogramStats(bins)
    with pytest.raises(CalibrationError, match="axis"):
        HistogramStats(64, axis=3).update(
            torch.randn(2, 2, generator=torch.Generator().manual_seed(4))
        )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_batch_raises_and_leaves_the_state_untouched(bad):
    h = _stream([torch.randn(100, generator=torch.Generator().manual_seed(5))], bins=64)
    before = {k: v.clone() for k, v in _state(h).items()}
    x = torch.randn(100, generator=torch.Generator().manual_seed(6))
    x[7] = bad
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        h.update(x)
    for k, v in _state(h).items():
        assert torch.equal(v, before[k]), k


def test_empty_batch_is_ignored():
    h = HistogramStats(64)
    h.update(torch.empty(0))
    assert h.counts is None and h.lo is None
    m = MinMaxStats()
    m.update(torch.empty(0, 3))
    assert m.lo is None


# -- memory ---------------------------------------------------------------------------------------


def _nbytes(h: HistogramStats) -> dict[str, tuple[tuple[int, ...], int]]:
    return {k: (tuple(v.shape), v.numel() * v.element_size()) for k, v in _state(h).items()}


@pytest.mark.parametrize("axis", [None, 1])
def test_state_size_does_not_grow_with_the_number_of_batches(axis):
    g = torch.Generator().manual_seed(6)
    h = HistogramStats(256, axis)
    h.update(torch.randn(8, 4, generator=g))
    after_one = _nbytes(h)
    for i in range(999):  # the range keeps growing, so the grid is remapped many times
        h.update(torch.randn(8, 4, generator=g) * (1 + i / 10))
    assert _nbytes(h) == after_one
    assert float(h.counts.sum()) == 1000 * 32


# -- folded histogram of |x| ----------------------------------------------------------------------


def _direct_folded(x: np.ndarray, w: float, m: int) -> np.ndarray:
    """Histogram of ``|x|`` at width ``w``; bin ``k`` holds ``x ≥ 0`` in ``[k·w, (k+1)·w)`` and
    ``x < 0`` with ``|x|`` in ``(k·w, (k+1)·w]`` (the bins are the signed bins, mirrored)."""
    pos = np.floor(x[x >= 0] / w).astype(np.int64)
    neg = (np.ceil(-x[x < 0] / w) - 1).astype(np.int64)
    return np.bincount(np.concatenate([pos, neg]), minlength=m)


@FAST
@given(x=datasets(), cuts=st.lists(st.integers(0, 3000), max_size=5))
def test_folded_equals_the_direct_histogram_of_abs_x(x, cuts):
    h = _stream(_split(x, cuts))
    folded, w = h.folded()
    assert folded.shape[1] <= h.nbins
    direct = _direct_folded(x.double().numpy(), float(w[0]), folded.shape[1])
    assert direct.shape[0] == folded.shape[1]  # no empty trailing bins
    np.testing.assert_array_equal(folded[0].numpy(), direct)
    dz, _ = h.folded(drop_zeros=True)
    direct[0] -= int((x == 0).sum())
    np.testing.assert_array_equal(dz[0].numpy(), direct)


def test_folded_per_channel_with_different_widths():
    g = torch.Generator().manual_seed(7)
    x = torch.stack(
        [
            torch.randn(1000, generator=g),
            1e4 + torch.rand(1000, generator=g),  # far from 0: folded bins are merged
            torch.zeros(1000),
            -torch.rand(1000, generator=g) * 1e-5,
        ]
    )
    h = _stream([x[:, :300], x[:, 300:]], bins=512, axis=0)
    folded, w = h.folded()
    assert folded.shape == (4, folded.shape[1]) and folded.shape[1] <= 512
    for c in range(4):
        direct = _direct_folded(x[c].double().numpy(), float(w[c]), folded.shape[1])
        np.testing.assert_array_equal(folded[c].numpy(), direct)
    assert float(w[1]) > float(h.width()[1])  # merged: 1e4 / w_fine would need ~4e6 bins
