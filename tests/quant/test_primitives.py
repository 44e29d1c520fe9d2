"""Property tests of the quantization primitives (:mod:`ptqkit.quant.primitives`), and bit-exact
parity of ``quantize`` with ONNX Runtime's ``QuantizeLinear`` at 8 bits."""

from __future__ import annotations

import functools
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper

from ptqkit.config import QuantSpec
from ptqkit.errors import CalibrationError
from ptqkit.quant import MIN_SCALE, dequantize, fake_quant, qparams, quantize, storage_dtype

ALL_SPECS = [QuantSpec(bits=b, symmetric=s) for b in range(2, 17) for s in (True, False)]

specs = st.builds(QuantSpec, bits=st.integers(2, 16), symmetric=st.booleans())
# finite float32 values, with magnitudes from 1e-6 to 1e6 (and 0)
bounds = st.one_of(
    st.just(0.0),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32).filter(
        lambda v: v == 0 or abs(v) > 1e-6
    ),
)
fractions = arrays(np.float64, st.integers(1, 64), elements=st.floats(0.0, 1.0))

FAST = settings(max_examples=60, deadline=None, derandomize=True)


def _ordered(a: float, b: float) -> tuple[float, float]:
    return min(a, b), max(a, b)


def _samples(lo: float, hi: float, u: np.ndarray) -> torch.Tensor:
    """float32 values inside ``[lo, hi]``: the ends, 0 when inside, and ``lo + u (hi - lo)``."""
    x = np.concatenate([[lo, hi], [0.0] if lo <= 0 <= hi else [], lo + u * (hi - lo)])
    return torch.from_numpy(np.clip(x.astype(np.float32), np.float32(lo), np.float32(hi)))


# -- round trip, zero, grid -----------------------------------------------------------------------


@FAST
@given(spec=specs, a=bounds, b=bounds, u=fractions)
def test_roundtrip_error_is_at_most_half_a_step_inside_the_range(spec, a, b, u):
    lo, hi = _ordered(a, b)
    scale, zp = qparams(lo, hi, spec)
    x = _samples(lo, hi, u)
    xr = dequantize(quantize(x, scale, zp, spec), scale, zp)
    err = (xr.double() - x.double()).abs()
    s = float(scale)
    # s/2 in exact arithmetic; float32 rounding of x/s, of the scale and of (q - z)·s add a few ulps
    tol = 0.5 * s + 1e-6 * (x.double().abs() + (hi - lo) + s)
    assert bool((err <= tol).all()), (float((err - tol).max()), s)


@FAST
@given(spec=specs, a=bounds, b=bounds)
def test_zero_is_exact_for_every_spec_and_range(spec, a, b):
    lo, hi = _ordered(a, b)
    scale, zp = qparams(lo, hi, spec)
    assert spec.qmin <= int(zp) <= spec.qmax
    x = torch.tensor([0.0, -0.0])
    q = quantize(x, scale, zp, spec)
    assert q.tolist() == [int(zp), int(zp)]
    assert dequantize(q, scale, zp).tolist() == [0.0, 0.0]
    assert fake_quant(x, scale, zp, spec).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_grid_has_exactly_2_pow_bits_levels(spec):
    assert spec.qmax - spec.qmin + 1 == 2**spec.bits
    assert spec.qmin == (-(2 ** (spec.bits - 1)) if spec.symmetric else 0)
    scale, zp = qparams(-1.0, 1.0, spec)
    # a sweep well past both ends of the range, about 3 points per step
    x = torch.linspace(-3.0, 3.0, 9 * 2**spec.bits + 1)
    q = quantize(x, scale, zp, spec).long()
    assert int(q.min()) == spec.qmin and int(q.max()) == spec.qmax
    hits = torch.bincount(q - spec.qmin)
    assert hits.numel() == 2**spec.bits and bool((hits > 0).all())  # every level, no other


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_qparams_formulas_and_storage_dtype(spec):
    lo, hi = -1.5, 3.0
    scale, zp = qparams(lo, hi, spec)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    if spec.symmetric:
        assert float(scale) == pytest.approx(3.0 / (2 ** (spec.bits - 1) - 1), rel=1e-6)
        assert int(zp) == 0
    else:
        assert float(scale) == pytest.approx(4.5 / (2**spec.bits - 1), rel=1e-6)
        assert int(zp) == round(1.5 / float(scale))
    q = quantize(torch.tensor([-1e9, lo, 0.0, hi, 1e9]), scale, zp, spec)
    assert q.dtype == storage_dtype(spec)
    assert int(q[0]) == spec.qmin and int(q[-1]) == spec.qmax
    assert int(q[2]) == int(zp)


@pytest.mark.parametrize(
    ("bits", "symmetric", "dtype"),
    [
        (2, True, torch.int8),
        (8, True, torch.int8),
        (2, False, torch.uint8),
        (8, False, torch.uint8),
        (9, True, torch.int16),
        (9, False, torch.int16),
        (15, False, torch.int16),
        (16, True, torch.int16),
        (16, False, torch.int32),
    ],
)
def test_quantize_output_dtype(bits, symmetric, dtype):
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    assert storage_dtype(spec) == dtype
    info = torch.iinfo(dtype)
    assert info.min <= spec.qmin and spec.qmax <= info.max
    scale, zp = qparams(-2.0, 2.0, spec)
    q = quantize(
        torch.randn(3, 4, generator=torch.Generator().manual_seed(1)) * 10, scale, zp, spec
    )
    assert q.dtype == dtype
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax


# -- per-channel ----------------------------------------------------------------------------------


@st.composite
def tensors_and_axis(draw):
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 10 ** draw(st.integers(-3, 3))
    if draw(st.booleans()):  # an all-zero channel
        x.select(axis, 0).zero_()
    return x, axis


@FAST
@given(xa=tensors_and_axis(), bits=st.integers(2, 16), symmetric=st.booleans())
def test_per_channel_equals_per_tensor_channel_by_channel(xa, bits, symmetric):
    x, axis = xa
    pc = QuantSpec(bits=bits, symmetric=symmetric, per_channel=True, axis=axis)
    pt = QuantSpec(bits=bits, symmetric=symmetric)
    rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    lo, hi = rows.amin(1), rows.amax(1)
    scale, zp = qparams(lo, hi, pc)
    assert scale.shape == zp.shape == (x.shape[axis],)
    q = quantize(x, scale, zp, pc)
    xr = dequantize(q, scale, zp, axis)
    fq = fake_quant(x, scale, zp, pc)
    for c in range(x.shape[axis]):
        s_c, z_c = qparams(float(lo[c]), float(hi[c]), pt)
        assert torch.equal(s_c, scale[c]) and torch.equal(z_c, zp[c])
        xc = x.select(axis, c)
        q_c = quantize(xc, s_c, z_c, pt)
        assert torch.equal(q.select(axis, c), q_c)
        assert torch.equal(xr.select(axis, c), dequantize(q_c, s_c, z_c))
        assert torch.equal(fq.select(axis, c), fake_quant(xc, s_c, z_c, pt))


# -- rounding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_round_half_to_even_on_exact_ties_table(symmetric):
    spec = QuantSpec(bits=8, symmetric=symmetric)
    s = 0.25  # a power of two: (k + 1/2)·s is exact in float32, and so is x / s
    z = 0 if symmetric else 100
    scale, zp = torch.tensor(s), torch.tensor(z, dtype=torch.int32)
    halves = [0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 126.5, -99.5]
    expected = [0, 2, 2, 4, 0, -2, -2, -4, 126, -100]
    q = quantize(torch.tensor(halves) * s, scale, zp, spec)
    want = [min(max(e + z, spec.qmin), spec.qmax) for e in expected]
    assert q.long().tolist() == want
    # the tie is broken on x / s, before the zero point is added (ONNX QuantizeLinear)
    fq = fake_quant(torch.tensor(halves) * s, scale, zp, spec)
    assert fq.tolist() == [(w - z) * s for w in want]


@FAST
@given(
    spec=specs,
    e=st.integers(-20, 20),
    k=st.lists(st.integers(-(2**16), 2**16), min_size=1, max_size=32),
    zfrac=st.floats(0, 1),
)
def test_round_half_to_even_on_exact_ties(spec, e, k, zfrac):
    s = 2.0**e
    z = 0 if spec.symmetric else round(zfrac * spec.qmax)
    x = (np.array(k, dtype=np.float64) + 0.5) * s  # exact in float32: |k| < 2^22
    assert np.array_equal(x.astype(np.float32).astype(np.float64), x)
    q = quantize(torch.from_numpy(x.astype(np.float32)), torch.tensor(s), torch.tensor(z), spec)
    want = np.clip(np.rint(np.array(k) + 0.5) + z, spec.qmin, spec.qmax)  # numpy: half to even
    assert np.array_equal(q.long().numpy(), want.astype(np.int64))
    assert all(int(v) % 2 == 0 for v in np.rint(np.array(k) + 0.5))


# -- degenerate ranges ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_all_zero_tensor_gives_positive_scale_and_no_nan(spec):
    x = torch.zeros(4, 5)
    scale, zp = qparams(x.min(), x.max(), spec)
    assert float(scale) == float(np.float32(MIN_SCALE)) > 0
    assert spec.qmin <= int(zp) <= spec.qmax
    assert int(zp) == (0 if spec.symmetric else spec.qmin)
    fq = fake_quant(x, scale, zp, spec)
    assert torch.equal(fq, x)
    assert not torch.isnan(dequantize(quantize(x, scale, zp, spec), scale, zp)).any()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 8, 16])
def test_all_zero_channel_gives_positive_scale_and_no_nan(bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric, per_channel=True, axis=1)
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(bits))
    x[:, 2] = 0.0
    rows = x.movedim(1, 0).reshape(4, -1)
    scale, zp = qparams(rows.amin(1), rows.amax(1), spec)
    assert bool((scale > 0).all()) and float(scale[2]) == float(np.float32(MIN_SCALE))
    fq = fake_quant(x, scale, zp, spec)
    assert torch.isfinite(fq).all()
    assert torch.equal(fq[:, 2], torch.zeros(3, 5))
    other = [0, 1, 3]
    err = (fq[:, other] - x[:, other]).abs().movedim(1, 0).reshape(3, -1).amax(1)
    # half a step, plus float32 rounding of x / s and (q - z)·s (a few ulps of |x| ≤ 5)
    assert bool((err <= scale[other] * 0.5 + 5e-6).all())


@pytest.mark.parametrize("symmetric", [True, False])
def test_constant_positive_range_contains_the_value(symmetric):
    spec = QuantSpec(bits=8, symmetric=symmetric)
    scale, zp = qparams(3.0, 3.0, spec)  # widened to [0, 3]
    assert float(fake_quant(torch.tensor(3.0), scale, zp, spec)) == pytest.approx(3.0, rel=1e-6)


@pytest.mark.parametrize(
    ("lo", "hi"),
    [
        (math.nan, 1.0),
        (-1.0, math.nan),
        (-math.inf, 1.0),
        (-1.0, math.inf),
        (math.nan, math.nan),
        (torch.tensor([-1.0, math.nan]), torch.tensor([1.0, 1.0])),
        (torch.tensor([-1.0, -2.0]), torch.tensor([math.inf, 1.0])),
    ],
)
@pytest.mark.parametrize("symmetric", [True, False])
def test_non_finite_range_raises_calibration_error(lo, hi, symmetric):
    with pytest.raises(CalibrationError, match="not finite"):
        qparams(lo, hi, QuantSpec(symmetric=symmetric))


def test_inverted_range_raises_calibration_error():
    with pytest.raises(CalibrationError, match="lo > hi"):
        qparams(2.0, 1.0, QuantSpec())


# -- fake_quant -----------------------------------------------------------------------------------


@FAST
@given(
    spec=specs,
    a=bounds,
    b=bounds,
    x=arrays(
        np.float32,
        st.integers(1, 50),
        elements=st.floats(-1e7, 1e7, allow_nan=False, allow_infinity=False, width=32),
    ),
)
def test_fake_quant_equals_dequantize_of_quantize(spec, a, b, x):
    lo, hi = _ordered(a, b)
    scale, zp = qparams(lo, hi, spec)
    xt = torch.from_numpy(x)
    assert torch.equal(
        fake_quant(xt, scale, zp, spec), dequantize(quantize(xt, scale, zp, spec), scale, zp)
    )


def test_fake_quant_non_finite_inputs():
    spec = QuantSpec(bits=8, symmetric=False)
    scale, zp = qparams(-1.0, 2.0, spec)
    out = fake_quant(torch.tensor([math.inf, -math.inf, math.nan]), scale, zp, spec)
    assert float(out[0]) == pytest.approx((spec.qmax - int(zp)) * float(scale))
    assert float(out[1]) == pytest.approx((spec.qmin - int(zp)) * float(scale))
    assert math.isnan(float(out[2]))


# -- parity with ONNX Runtime QuantizeLinear ------------------------------------------------------


@functools.cache
def _ort_quantize_linear(rank: int, per_channel: bool, axis: int, unsigned: bool):
    zt = TensorProto.UINT8 if unsigned else TensorProto.INT8
    attrs = {"axis": axis} if per_channel else {}
    node = helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["y"], **attrs)
    dims = [f"d{i}" for i in range(rank)]
    pshape = ["c"] if per_channel else []
    graph = helper.make_graph(
        [node],
        "quantize_linear",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, dims),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, pshape),
            helper.make_tensor_value_info("zp", zt, pshape),
        ],
        [helper.make_tensor_value_info("y", zt, dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _ort_quantize(x: torch.Tensor, scale, zp, spec: QuantSpec) -> np.ndarray:
    unsigned = not spec.symmetric
    sess = _ort_quantize_linear(x.dim(), spec.per_channel, spec.axis % x.dim(), unsigned)
    zdt = np.uint8 if unsigned else np.int8
    feeds = {
        "x": x.numpy(),
        "scale": scale.numpy().astype(np.float32),
        "zp": zp.numpy().astype(zdt),
    }
    return sess.run(None, feeds)[0]


def _with_ties(x: torch.Tensor, scale: torch.Tensor, axis: int | None, g: torch.Generator):
    """Replace a third of ``x`` by ``(k + 1/2)·s`` (exact or nearest float32 ties) and a few
    values by far-outside-the-range ones."""
    x = x.clone()
    s = scale if axis is None else scale.reshape([-1 if i == axis else 1 for i in range(x.dim())])
    k = torch.randint(-300, 300, x.shape, generator=g).float()
    ties = ((k + 0.5) * s).expand_as(x)
    mask = torch.rand(x.shape, generator=g) < 1 / 3
    x[mask] = ties[mask]
    far = torch.rand(x.shape, generator=g) < 0.02
    x[far] = x[far] * 1e3
    return x


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    symmetric=st.booleans(),
    pow2_scale=st.booleans(),
    n=st.integers(1, 3000),
)
def test_quantize_matches_onnxruntime_per_tensor(seed, symmetric, pow2_scale, n):
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits=8, symmetric=symmetric)
    x = torch.randn(n, generator=g) * float(torch.empty(1).uniform_(0.01, 100, generator=g))
    x = x + float(torch.randn(1, generator=g)) * x.abs().max()
    if pow2_scale:  # exact ties
        scale = torch.tensor(2.0 ** int(torch.randint(-8, 4, (1,), generator=g)))
        zp = torch.tensor(0 if symmetric else int(torch.randint(0, 256, (1,), generator=g)))
    else:
        scale, zp = qparams(x.min(), x.max(), spec)
    x = _with_ties(x, scale, None, g)
    got = quantize(x, scale, zp, spec).numpy()
    want = _ort_quantize(x, scale, zp, spec)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    symmetric=st.booleans(),
    shape=st.lists(st.integers(1, 8), min_size=1, max_size=4),
    axis_pick=st.integers(0, 3),
)
def test_quantize_matches_onnxruntime_per_channel(seed, symmetric, shape, axis_pick):
    g = torch.Generator().manual_seed(seed)
    axis = axis_pick % len(shape)
    spec = QuantSpec(bits=8, symmetric=symmetric, per_channel=True, axis=axis)
    x = torch.randn(shape, generator=g)
    x = x * torch.rand(shape[axis], generator=g).mul(10).reshape(
        [-1 if i == axis else 1 for i in range(len(shape))]
    )
    rows = x.movedim(axis, 0).reshape(shape[axis], -1)
    scale, zp = qparams(rows.amin(1), rows.amax(1), spec)
    x = _with_ties(x, scale, axis, g)
    got = quantize(x, scale, zp, spec).numpy()
    want = _ort_quantize(x, scale, zp, spec)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_matches_onnxruntime_on_a_large_tensor(symmetric):
    """Large enough for ONNX Runtime's vectorized kernels (not only their scalar tails)."""
    g = torch.Generator().manual_seed(1)
    spec = QuantSpec(bits=8, symmetric=symmetric)
    x = torch.randn(1 << 16, generator=g) * 3
    scale, zp = qparams(x.min(), x.max(), spec)
    x = _with_ties(x, scale, None, g)
    np.testing.assert_array_equal(
        quantize(x, scale, zp, spec).numpy(), _ort_quantize(x, scale, zp, spec)
    )
