"""Exactness of the mergeable histogram statistics (:class:`ptqkit.calibrate.HistogramStats`):
the state after a stream is a function of the multiset of values only (batch split, order,
merge tree), bounded in size, and equal to the histogram computed directly from the data (the
log-scale bins of the float32 bit patterns, computed here independently in numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptqkit.calibrate import HistogramStats, MinMaxStats
from ptqkit.calibrate.stats import BINADES, MANTISSA_BITS, as_channels
from ptqkit.errors import CalibrationError

FAST = settings(max_examples=30, deadline=None, derandomize=True)


def _state(h: HistogramStats) -> dict[str, torch.Tensor]:
    return {
        "counts": h.counts,
        "top": h.top,
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
    if value >= 0:
        assert float(edges[j]) <= value < float(edges[j + 1])
    else:
        assert float(edges[j]) < value <= float(edges[j + 1])
    assert float(h.zeros[0]) == (300 if value == 0 else 0)
    folded, fedges = h.folded()
    assert folded.shape[1] == _N  # bounded, however far from 0 the constant is
    assert float(folded.sum()) == 300
    k = int(torch.nonzero(folded[0])[0])
    assert float(fedges[0, k]) <= abs(value) < float(fedges[0, k + 1])


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
    _check_direct_histogram(h, torch.cat(batches).reshape(1, -1))


def test_tiny_negative_values_next_to_a_huge_range_stay_negative():
    """Tiny negative values (below the window, subnormal) stay on the negative side, and -0.0
    counts as +0.0 (a zero), whatever the batch split."""
    x = torch.tensor([-1e-38, -1e-30, 3e-39, 0.0, -0.0, 1e10, -1e10])
    one = _stream([x])
    _check_direct_histogram(one, x.reshape(1, -1))
    assert float(one.zeros[0]) == 2 and float(one.counts[0, :_N].sum()) == 3
    assert_same_state(one, _stream([x[:4], x[4:]]))
    assert_same_state(one, _stream([x[i : i + 1] for i in range(7)]))


_N = BINADES * 2**MANTISSA_BITS  # magnitude bins per sign


def _direct_index(x: np.ndarray) -> np.ndarray:
    """Signed-order bin index of each float32 value, from its bit pattern (numpy): the window
    of ``BINADES`` binades below the binade of ``max |x|``, the smaller magnitudes in bin 0."""
    a = np.abs(x.astype(np.float32))
    keys = (a.view(np.uint32) >> (23 - MANTISSA_BITS)).astype(np.int64)
    top_binade = int(a.max().view(np.uint32) >> 23) + 1
    top = min(max(top_binade << MANTISSA_BITS, _N), 255 << MANTISSA_BITS)
    j = np.clip(keys - (top - _N), 0, _N - 1)
    return np.where(x < 0, _N - 1 - j, _N + j)


def _check_direct_histogram(h: HistogramStats, rows: torch.Tensor) -> None:
    """``counts`` is the histogram of the data computed directly from the bit patterns, and
    every value lies inside the edges of its bin (``[v_k, v_k+1)``, mirrored for x < 0)."""
    for c in range(rows.shape[0]):
        x = rows[c].float().numpy()
        idx = _direct_index(x)
        direct = np.bincount(idx, minlength=2 * _N)
        np.testing.assert_array_equal(h.counts[c].numpy(), direct)
        e = h.edges()[c].numpy()
        xd = x.astype(np.float64)
        pos, neg = xd >= 0, xd < 0
        inner = (idx != _N) & (idx != _N - 1)  # bins 0 also hold every smaller magnitude
        assert np.all(e[idx][pos] <= xd[pos]) and np.all(xd[pos] < e[idx + 1][pos])
        assert np.all(e[idx + 1][neg] >= xd[neg]) and np.all(xd[neg & inner] > e[idx][neg & inner])


@FAST
@given(x=datasets(), cuts=st.lists(st.integers(0, 3000), max_size=5))
def test_counts_equal_the_direct_histogram_at_the_final_width(x, cuts):
    h = _stream(_split(x, cuts))
    _check_direct_histogram(h, x.reshape(1, -1))
    assert float(h.zeros[0]) == float((x == 0).sum())
    assert h.counts.shape == (1, 2 * _N)


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
    assert h.counts.shape == (n_ch, 2 * _N)
    assert h.top.shape == h.zeros.shape == h.lo.shape == (n_ch,)
    for c in range(n_ch):
        ref = _stream([x.select(axis, c)], bins=128)
        for k in ("counts", "top", "zeros", "lo", "hi"):
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


def _direct_folded(x: np.ndarray) -> np.ndarray:
    """Histogram of ``|x|`` on the magnitude bins (the signed bins, mirrored)."""
    idx = _direct_index(x)
    return np.bincount(np.where(idx >= _N, idx - _N, _N - 1 - idx), minlength=_N)


@FAST
@given(x=datasets(), cuts=st.lists(st.integers(0, 3000), max_size=5))
def test_folded_equals_the_direct_histogram_of_abs_x(x, cuts):
    h = _stream(_split(x, cuts))
    folded, fedges = h.folded()
    assert folded.shape[1] == _N and fedges.shape[1] == _N + 1
    direct = _direct_folded(x.numpy())
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
    folded, fedges = h.folded()
    assert folded.shape == (4, _N)
    for c in range(4):
        np.testing.assert_array_equal(folded[c].numpy(), _direct_folded(x[c].numpy()))
    # each channel has its own window: the top edge is the binade above its own max |x|
    for c in range(4):
        amax = float(x[c].abs().max())
        top = float(fedges[c, -1])
        assert (amax < top <= 2 * amax) if amax > 2.0**-100 else top > 0


# -- outliers -------------------------------------------------------------------------------------


def test_an_outlier_does_not_change_the_bins_of_the_other_values():
    """Resolution independent of the largest value: with one 1e6 among N(0, 1) data, every
    ordinary value keeps its bin (same edges, same count) as without it."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(40_960, generator=g)
    clean = _stream(torch.split(x, 4096))
    dirty = _stream(torch.split(torch.cat([x[:20_000], torch.tensor([1e6]), x[20_000:]]), 4096))
    fc, ec = clean.folded()
    fd, ed = dirty.folded()
    assert float(fd.sum()) == 40_961
    # above 1e6 · 2^-32 (2.3e-4) the bins are the same (edges and counts) with and without it
    lc = ec[0, :-1] >= 1e-3
    ld = (ed[0, :-1] >= 1e-3) & (ed[0, :-1] < ec[0, -1])
    assert torch.equal(ec[0, :-1][lc], ed[0, :-1][ld])
    assert torch.equal(fc[0][lc], fd[0][ld])
    assert float(fc[0][lc].sum()) > 40_900  # nearly every ordinary value is compared


# -- layouts and the caller's extremes ------------------------------------------------------------


def test_channels_last_input_and_given_bounds_give_the_same_state():
    """A channels-last batch (read in memory order, no copy) and the extremes handed over by the
    caller (the outlier watch's) leave exactly the state of the plain contiguous batch; so do
    per-tensor data with -0.0 and subnormals (the 16-bit key path moves -0.0 to +0.0)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 5, 7, generator=g)
    x[0, 0, 0, :3] = torch.tensor([0.0, -0.0, -1e-40])
    x[1] = x[1].relu()
    cl = x.contiguous(memory_format=torch.channels_last)
    plain, other, given = HistogramStats(64), HistogramStats(64), HistogramStats(64)
    for b in (x[:2], x[2:] * 50):
        plain.update(b.contiguous())
    for b in (cl[:2], cl[2:] * 50):
        other.update(b)
        given.update(b, (b.amin().reshape(1), b.amax().reshape(1)))
    assert_same_state(plain, other)
    assert_same_state(plain, given)
    _check_direct_histogram(other, torch.cat([x[:2].reshape(1, -1), 50 * x[2:].reshape(1, -1)], 1))
    assert float(other.zeros[0]) == float((x == 0).sum()) == 2 + float((x[1] == 0).sum())
