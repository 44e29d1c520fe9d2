"""What the calibrator tests share: the registered names, the usual specs, the registered
calibrator fed with batches, and known distributions drawn with a fixed seed."""

from __future__ import annotations

import functools
import inspect

import numpy as np
import torch

from ptqkit.calibrate import CALIBRATORS, make_calibrator
from ptqkit.config import QuantSpec
from ptqkit.quant import fake_quant, qparams

NAMES = sorted(CALIBRATORS)
ORDER_FREE = [n for n in NAMES if n != "ema"]  # ema is order dependent by definition
SYM, ASYM = QuantSpec(bits=8, symmetric=True), QuantSpec(bits=8, symmetric=False)


def make(name: str, axis: int | None = None, bins: int | None = None, **kw):
    """The registered calibrator, with ``bins`` only where the factory takes it."""
    params = inspect.signature(CALIBRATORS[name]).parameters
    if bins is not None and "bins" in params:
        kw["bins"] = bins
    if axis is not None:
        kw["axis"] = axis
    return make_calibrator(name, **kw)


def observed(name: str, batches, axis=None, bins=512, **kw):
    cal = make(name, axis, bins, **kw)
    for b in batches:
        cal.observe(b)
    return cal


def spec_for(symmetric: bool, axis: int | None, bits: int = 8) -> QuantSpec:
    if axis is None:
        return QuantSpec(bits=bits, symmetric=symmetric)
    return QuantSpec(bits=bits, symmetric=symmetric, per_channel=True, axis=axis)


def sample_mse(x: torch.Tensor, lo, hi, spec: QuantSpec) -> float:
    """Mean squared error of the actual samples fake-quantized with the range ``[lo, hi]``."""
    scale, zp = qparams(lo, hi, spec)
    return float((fake_quant(x, scale, zp, spec).double() - x.double()).pow(2).mean())


# -- known distributions, fixed seed --------------------------------------------------------------


@functools.cache
def dist(kind: str, n: int = 200_000) -> torch.Tensor:
    rng = np.random.default_rng(1234)
    if kind == "gaussian":
        x = rng.standard_normal(n)
    elif kind == "laplace":
        x = rng.laplace(size=n)
    elif kind == "relu":
        x = np.maximum(rng.standard_normal(n), 0.0)
    elif kind == "heavy":  # Student-t df=2 with a few 1e3 outliers
        x = rng.standard_t(2, n)
        x[rng.choice(n, 6, replace=False)] = [1e3, -1e3, 1e3, -1e3, 1e3, 1e3]
    else:
        raise ValueError(kind)
    return torch.from_numpy(x.astype(np.float32))


DISTS = ["gaussian", "laplace", "relu", "heavy"]
