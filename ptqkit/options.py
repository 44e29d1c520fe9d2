"""Options of the techniques that :class:`ptqkit.PTQConfig` switches on: frozen dataclasses
with the papers' defaults, validated on construction, and the validators they share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


def _positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be an int >= 1, got {value!r}")


def _positive_number(value: Any, what: str, zero: bool = False) -> None:
    ok = _is_number(value) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        kind = "non-negative" if zero else "positive"
        raise ConfigError(f"{what} must be a {kind} number, got {value!r}")


@dataclass(frozen=True)
class BiasCorrectionOptions:
    """Hyperparameters of empirical bias correction (:mod:`ptqkit.correct.bias`).

    Fields:
        samples: the per-channel means are taken over (at most) the first this many
            calibration samples (default 64: a per-channel mean over 64 samples × positions is
            precise, and bias correction's quantized pass costs what it reads. On
            EfficientNet-Lite0 with 128 calibration crops, 1,000 held-out: top-1 agreement
            97.6 % with 64, 97.3 % with all 128, 96.6 % with 32; AIMET's bias correction
            likewise takes its own, smaller sample count).
        memory_budget: bytes of cached layer inputs kept in memory; past it they spill to disk.
        rows: ``"affine"`` only: output positions per layer, sampled over those samples, at
            which the float and quantized outputs are paired to fit each channel's scale
            (memory: ``rows × channels`` floats per layer, kept from the calibration pass).
    """

    samples: int = 64
    memory_budget: int = 2 << 30
    rows: int = 1024

    def __post_init__(self) -> None:
        _positive_int(self.samples, "BiasCorrectionOptions.samples")
        _positive_int(self.rows, "BiasCorrectionOptions.rows")
        _positive_int(self.memory_budget, "BiasCorrectionOptions.memory_budget")


#: what AdaRound fits each rounding to: its layer's output, or its block's (BRECQ)
GRANULARITIES = ("layer", "block")


@dataclass(frozen=True)
class AdaRoundOptions:
    """Hyperparameters of AdaRound (:mod:`ptqkit.correct.adaround`; Nagel et al. 2020).

    Fields:
        reg: weight λ of the rounding regularizer.
        beta: ``(start, end)`` of the annealed exponent β of the regularizer.
        warmup: fraction of the iterations before the regularizer is switched on.
        lr: Adam learning rate on ``V``.
        max_rows: output positions kept per layer (sampled), in all.
        rows_per_batch: output positions sampled per layer from each batch.
        rows_per_step: rows per optimization step.
        depthwise_rows_per_step: rows per step of a layer with one output channel per group
            (depthwise): each channel has only its few (e.g. 9) weights to fit, and on
            MobileNetV2-style W4A8 the 1,024-row steps of the depthwise layers were 60% of the
            optimization time, for no better accuracy than 256 (drop 0.07/0.12/0.18 points with
            1,024 rows, -0.11/0.12/0.09 with 256, seeds 0/1/2).
        memory_budget: bytes of cached layer inputs kept in memory; past it they spill to disk.
        granularity: ``"layer"`` (AdaRound: each layer's rounding fitted to its own output) or
            ``"block"`` (BRECQ, :mod:`ptqkit.correct.brecq`: the roundings of a block's layers
            fitted jointly to the block's output; a model that cannot be cut into blocks is
            rounded layer by layer, with a warning).
        block_layers: ``"block"``: most layers per block when a chain of layers is grouped (a
            residual block is one block whatever its size).
        block_batch: ``"block"``: samples per optimization step.
        block_samples: ``"block"``: calibration samples used (their values at the current
            block's input are kept in memory, float and quantized).
        early_stop: end a layer's optimization once the regularizer is on and every soft
            rounding ``h(V)`` is exactly 0 or 1 (the gradients are then zero: the rounding is
            decided; see :mod:`ptqkit.correct.rounding`).
    """

    reg: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    lr: float = 1e-2
    max_rows: int = 8192
    rows_per_batch: int = 1024
    rows_per_step: int = 1024
    depthwise_rows_per_step: int = 256
    granularity: str = "layer"
    block_layers: int = 3
    block_batch: int = 32
    block_samples: int = 1024
    memory_budget: int = 2 << 30
    early_stop: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.early_stop, bool):
            raise ConfigError(f"AdaRoundOptions.early_stop must be a bool, got {self.early_stop!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"AdaRoundOptions.granularity must be one of {GRANULARITIES}, "
                f"got {self.granularity!r}"
            )
        if isinstance(self.beta, list):
            object.__setattr__(self, "beta", tuple(self.beta))
        if not isinstance(self.beta, tuple) or len(self.beta) != 2:
            raise ConfigError(f"AdaRoundOptions.beta must be (start, end), got {self.beta!r}")
        for b in self.beta:
            _positive_number(b, "AdaRoundOptions.beta")
        _positive_number(self.reg, "AdaRoundOptions.reg", zero=True)
        _positive_number(self.lr, "AdaRoundOptions.lr")
        if not (_is_number(self.warmup) and 0.0 <= self.warmup < 1.0):
            raise ConfigError(f"AdaRoundOptions.warmup must be in [0, 1), got {self.warmup!r}")
        for name in (
            "max_rows",
            "rows_per_batch",
            "rows_per_step",
            "depthwise_rows_per_step",
            "memory_budget",
            "block_layers",
            "block_batch",
            "block_samples",
        ):
            _positive_int(getattr(self, name), f"AdaRoundOptions.{name}")


@dataclass(frozen=True)
class GPTQOptions:
    """Hyperparameters of GPTQ (:mod:`ptqkit.correct.gptq`; Frantar et al. 2022, "GPTQ: Accurate
    Post-Training Quantization for Generative Pre-trained Transformers"), the paper's defaults.

    Fields:
        damp: ``λ`` of the damping ``H + λ·mean(diag H)·I`` (relative to the mean diagonal).
        block_size: columns per lazy batch update (the paper's ``B = 128``).
        act_order: quantize the columns in order of decreasing ``diag(H)`` (the paper's
            "act-order"); group-wise scales stay those of consecutive input groups (the stored
            layout), each chosen when the first of its columns comes up.
        samples: calibration samples (at most) whose layer inputs build each ``H``.
        memory_budget: bytes of cached layer inputs kept in memory; past it they spill to disk.
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    samples: int = 128
    memory_budget: int = 2 << 30

    def __post_init__(self) -> None:
        _positive_number(self.damp, "GPTQOptions.damp")
        if not isinstance(self.act_order, bool):
            raise ConfigError(f"GPTQOptions.act_order must be a bool, got {self.act_order!r}")
        for name in ("block_size", "samples", "memory_budget"):
            _positive_int(getattr(self, name), f"GPTQOptions.{name}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["GRANULARITIES", "AdaRoundOptions", "BiasCorrectionOptions", "GPTQOptions"]
