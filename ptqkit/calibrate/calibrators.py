"""Calibrators: an observer of statistics plus a solver, registered by name.

Every calibrator is streaming (``observe`` keeps bounded statistics, never the activations) and
mergeable (``a.merge(b)`` makes ``a`` the calibrator that saw ``a``'s data then ``b``'s).
``compute_range(spec)`` returns ``(lo, hi)``: 0-d tensors per tensor, ``[C]`` per channel.

Non-finite values (NaN/Inf) in a batch raise :class:`ptqkit.errors.CalibrationError` naming the
calibrator: a range computed from them would be silently wrong.

Clipping guard. A calibrator whose range comes from a search that may cut into the data
(``clips = True``: kl) checks the share of the energy of the data's body (the values up to its
99.9th percentile ``Q``) that clipping turns into error,
``Σ_{|x| ≤ Q} (x - clamp(x, lo, hi))² / Σ_{|x| ≤ Q} x²``
(:func:`ptqkit.calibrate.bulk.clipped_energy`). Clipping the tail is KL's purpose; a
range that cuts into the body is a collapse. A good range keeps this share below 1 % (measured
over 200,000 values of Gaussian, Laplace and ReLU data at 4 and 8 bits, for KL, percentile and
auto_percentile: at most 0.43 %; KL on a Student-t with 2 degrees of freedom: 0 % at 8 bits,
14 % at 4 bits, where its range collapses); above :data:`MAX_CLIPPED_ENERGY` = 5 % (clipping alone
then caps the body's SQNR at 13 dB) the range is replaced by the MSE range
(:func:`ptqkit.calibrate.solvers.mse_range`, which weighs clipping against rounding) and the
calibrator keeps ``fallback = {"from", "to", "clipped_energy", "channels"}`` for ``ptq_info``.
``percentile`` is not guarded (its clip is the user's explicit choice of ``p``), nor is
``auto_percentile`` (it already picks its candidate by the expected error, clipping included).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import torch

from ..config import QuantSpec
from ..errors import CalibrationError, ConfigError
from . import entropy, solvers
from .bulk import clipped_energy
from .stats import HistogramStats, MinMaxStats, as_channels


@runtime_checkable
class Calibrator(Protocol):
    """What the pipeline needs of a calibrator."""

    def observe(self, x: torch.Tensor) -> None: ...

    def merge(self, other: Any) -> None: ...

    def compute_range(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]: ...


_REGISTRY: dict[str, Callable[..., Calibrator]] = {}
#: the registered calibrators by name, read-only: add one with :func:`register_calibrator`
CALIBRATORS: Mapping[str, Callable[..., Calibrator]] = MappingProxyType(_REGISTRY)
#: what ``PTQConfig.calibration`` may name besides a registered calibrator
PER_LAYER_CHOICE = "auto"


def register_calibrator(name: str, factory: Callable[..., Calibrator] | None = None) -> Any:
    """Register ``factory`` (callable with no arguments for its defaults) under ``name``.
    Usable as a decorator: ``@register_calibrator("mine")``. The one way to add a calibrator:
    :data:`CALIBRATORS` is a read-only view."""

    def add(f: Callable[..., Calibrator]) -> Callable[..., Calibrator]:
        if not isinstance(name, str) or not name or name == PER_LAYER_CHOICE:
            raise ConfigError(
                f"a calibrator name must be a non-empty string other than "
                f"{PER_LAYER_CHOICE!r}, got {name!r}"
            )
        if not callable(f):
            raise ConfigError(f"calibrator {name!r}: the factory must be callable, got {f!r}")
        _REGISTRY[name] = f
        return f

    return add(factory) if factory is not None else add


def check_calibration(name: str) -> None:
    """``ConfigError`` unless ``name`` is a registered calibrator or ``"auto"``: a config is
    checked against the registry where it is used (``quantize``, the CLI), not when it is built,
    so that a config naming a user calibrator can be built before that calibrator is
    registered (and read back from a file)."""
    if name != PER_LAYER_CHOICE and name not in _REGISTRY:
        raise ConfigError(
            f"unknown calibration {name!r}; choose one of {sorted([*_REGISTRY, PER_LAYER_CHOICE])}"
            " (or register it first with ptqkit.register_calibrator)"
        )


def make_calibrator(name: str, **options: Any) -> Calibrator:
    """Build the registered calibrator ``name`` with ``options``; a clear error otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown calibrator {name!r}; registered: {sorted(_REGISTRY)}")
    try:
        return _REGISTRY[name](**options)
    except TypeError as e:
        raise ConfigError(f"bad options for calibrator {name!r}: {e}") from None


class _Observed(Protocol):
    """Anything that says what it observed: ``lo`` is ``None`` before the first data."""

    @property
    def lo(self) -> torch.Tensor | None: ...


class _Base:
    name = "base"

    def __init__(self, axis: int | None) -> None:
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise ConfigError(f"{self.name}: axis must be None or an int, got {axis!r}")
        self.axis = axis

    def _check(self, stats: _Observed, spec: QuantSpec) -> None:
        if stats.lo is None:
            raise CalibrationError(
                f"{self.name}: compute_range called before any data was observed"
            )
        if spec.per_channel != (self.axis is not None) or (
            spec.per_channel and spec.axis != self.axis
        ):
            raise ConfigError(
                f"{self.name}: observed with axis={self.axis} but asked for per_channel="
                f"{spec.per_channel}, axis={spec.axis}; build the calibrator with axis=spec.axis"
            )

    def _out(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = lo.float(), hi.float()
        return (lo, hi) if self.axis is not None else (lo.reshape(()), hi.reshape(()))


class MinMaxCalibrator(_Base):
    """``lo = min x``, ``hi = max x`` over everything observed."""

    name = "minmax"

    def __init__(self, axis: int | None = None) -> None:
        super().__init__(axis)
        self.stats = MinMaxStats(axis, self.name)

    def observe(self, x: torch.Tensor) -> None:
        self.stats.update(x)

    def observe_bounded(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """:meth:`observe` given ``x``'s (per-tensor) ``lo``/``hi``: no second read of ``x``."""
        self.stats.update(x, (lo, hi))

    def merge(self, other: MinMaxCalibrator) -> None:
        self.stats.merge(other.stats)

    def compute_range(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(self.stats, spec)
        return self._out(*solvers.minmax_range(self.stats))


class EMACalibrator(_Base):
    """Moving average of the per-batch min/max (the chapter's "moyenne mobile"):
    ``m_1 = v_1``, ``m_t = β·m_{t-1} + (1-β)·v_t`` with momentum ``β``.

    Kept as ``m_t = β^(t-1)·v_1 + A_t`` with ``A_t = Σ_{k≥2} (1-β)·β^(t-k)·v_k``, which merges
    exactly in sequence order: ``A_{ab} = β^(n_b)·A_a + β^(n_b)... `` i.e. appending ``b``'s
    ``n_b`` batches gives ``m = β^(n_b)·m_a + (m_b - β^(n_b-1)·v_{b,1}) + (1-β)·β^(n_b-1)·v_{b,1}``.
    """

    name = "ema"

    def __init__(self, momentum: float = 0.9, axis: int | None = None) -> None:
        super().__init__(axis)
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ConfigError(f"ema: momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.batches = 0
        self.first: tuple[torch.Tensor, torch.Tensor] | None = None
        self.m: tuple[torch.Tensor, torch.Tensor] | None = None  # current (lo, hi) averages
        self.lo: torch.Tensor | None = None  # for _check

    def observe(self, x: torch.Tensor) -> None:
        b = MinMaxStats(self.axis, self.name)
        b.update(x)
        if b.lo is None or b.hi is None:
            return
        v = (b.lo.double(), b.hi.double())
        if self.m is None:
            self.first, self.m = v, v
        else:
            beta = self.momentum
            lo, hi = (beta * m + (1 - beta) * vi for m, vi in zip(self.m, v))
            self.m = (lo, hi)
        self.batches += 1
        self.lo = self.m[0]

    def merge(self, other: EMACalibrator) -> None:
        if other.m is None or other.first is None:  # both set by the first batch
            return
        if self.m is None:
            self.first, self.m, self.batches, self.lo = (
                other.first,
                other.m,
                other.batches,
                other.m[0],
            )
            return
        beta, n = self.momentum, other.batches
        decay = beta**n
        # other's average started at its first value instead of continuing ours
        lo, hi = (
            decay * mine + theirs - beta ** (n - 1) * f + (1 - beta) * beta ** (n - 1) * f
            for mine, theirs, f in zip(self.m, other.m, other.first)
        )
        self.m = (lo, hi)
        self.batches += n
        self.lo = self.m[0]

    def compute_range(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(self, spec)
        assert self.m is not None  # _check: some data was observed
        return self._out(*self.m)


#: most bins of the uniform grids the histogram solvers resample to
MAX_BINS = 2**20
#: share of the energy a clipping calibrator's range may turn into clipping error (see above)
MAX_CLIPPED_ENERGY = 0.05


class _HistogramCalibrator(_Base):
    """Shared observer of the histogram calibrators: one :class:`HistogramStats`."""

    #: whether the range may clip the data (then guarded, see the module docstring)
    clips = False

    def __init__(self, bins: int = 4096, axis: int | None = None) -> None:
        super().__init__(axis)
        if isinstance(bins, bool) or not isinstance(bins, int) or not 8 <= bins <= MAX_BINS:
            raise ConfigError(f"{self.name}: bins must be an int in 8..{MAX_BINS}, got {bins!r}")
        self.stats = HistogramStats(bins, axis, self.name)
        self.fallback: dict[str, Any] | None = None

    def observe(self, x: torch.Tensor) -> None:
        self.stats.update(x)

    def observe_bounded(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """:meth:`observe` given ``x``'s (per-tensor) ``lo``/``hi``: no second read of ``x``."""
        self.stats.update(x, (lo, hi))

    def merge(self, other: _HistogramCalibrator) -> None:
        self.stats.merge(other.stats)

    def compute_range(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(self.stats, spec)
        lo, hi = self._solve(spec)
        self.fallback = None
        if self.clips:
            share = clipped_energy(self.stats, lo, hi)
            bad = share > MAX_CLIPPED_ENERGY
            if bool(bad.any()):
                lo_m, hi_m = solvers.mse_range(self.stats, spec)
                lo, hi = torch.where(bad, lo_m, lo.double()), torch.where(bad, hi_m, hi.double())
                self.fallback = {
                    "from": self.name,
                    "to": "mse",
                    "clipped_energy": float(share.max()),
                    "channels": int(bad.sum()),
                }
        return self._out(lo, hi)

    def _solve(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class PercentileCalibrator(_HistogramCalibrator):
    """The ``p``-th percentile of the data (default 99.99), see
    :func:`ptqkit.calibrate.solvers.percentile_range`."""

    name = "percentile"

    def __init__(
        self, percentile: float = 99.99, bins: int = 4096, axis: int | None = None
    ) -> None:
        if not isinstance(percentile, (int, float)) or not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile: must be in (50, 100], got {percentile!r}")
        super().__init__(bins, axis)
        self.percentile = float(percentile)

    def _solve(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return solvers.percentile_range(self.stats, spec, self.percentile)


class KLCalibrator(_HistogramCalibrator):
    """Entropy calibration, TensorRT's: the threshold minimizing KL(P‖Q) on ``bins / 2``
    linear bins of ``|x|``, see :mod:`ptqkit.calibrate.entropy`."""

    name = "kl"
    clips = True

    def _solve(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return entropy.kl_range(self.stats, spec)


class KLLogCalibrator(KLCalibrator):
    """ptqkit's earlier KL variant, see :func:`ptqkit.calibrate.entropy.kl_log_range`."""

    name = "kl_log"

    def _solve(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return entropy.kl_log_range(self.stats, spec)


class MSECalibrator(_HistogramCalibrator):
    """The range minimizing the expected squared quantization error, see
    :func:`ptqkit.calibrate.solvers.mse_range`."""

    name = "mse"

    def _solve(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return solvers.mse_range(self.stats, spec)


class AutoPercentileCalibrator(_HistogramCalibrator):
    """Finds the best percentile itself (exercise 9.2.1): the candidate percentile whose range
    minimizes the expected quantization error; the choice is kept in ``chosen_percentile``."""

    name = "auto_percentile"

    def __init__(
        self,
        candidates: tuple[float, ...] = solvers.DEFAULT_PERCENTILES,
        bins: int = 4096,
        axis: int | None = None,
    ) -> None:
        candidates = tuple(candidates)
        if not candidates or not all(
            isinstance(p, (int, float)) and 50 < p <= 100 for p in candidates
        ):
            raise ConfigError(
                f"auto_percentile: candidates must be in (50, 100], got {candidates!r}"
            )
        super().__init__(bins, axis)
        self.candidates = candidates
        self.chosen_percentile: torch.Tensor | None = None

    def _solve(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi, self.chosen_percentile = solvers.auto_percentile_range(
            self.stats, spec, self.candidates
        )
        return lo, hi


for _cls in (
    MinMaxCalibrator,
    EMACalibrator,
    PercentileCalibrator,
    KLCalibrator,
    KLLogCalibrator,
    MSECalibrator,
    AutoPercentileCalibrator,
):
    register_calibrator(_cls.name, _cls)

__all__ = [
    "CALIBRATORS",
    "Calibrator",
    "as_channels",
    "check_calibration",
    "make_calibrator",
    "register_calibrator",
]
