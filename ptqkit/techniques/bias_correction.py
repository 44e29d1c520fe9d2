"""Bias correction (Nagel et al. 2019, section 4.2) in its modes: ``"empirical"`` (means),
``"affine"`` (scale and bias per channel), ``"analytic"`` (data-free, from BatchNorm
statistics), ``"auto"`` (affine where it is one quantized pass) (:mod:`ptqkit.correct.bias`).
The float side is taken during the calibration pass (its tap): it never iterates the data
again."""

from __future__ import annotations

from typing import Any

from ..config import BiasCorrectionOptions, PTQConfig
from ..records import Details
from ..stage import Context
from ..technique import Candidate, Technique, register


def _bias_correction(ctx: Context) -> None:
    from ..correct.bias import correct_bias

    correct_bias(ctx.qmodel, ctx.data, ctx.config, ctx.info, ctx.taps.get("bias_correction"))


def _tap(ctx: Context) -> Any:
    from ..correct.bias import float_means_tap

    return float_means_tap(ctx.qmodel, ctx.config)


def _needs_tap(config: PTQConfig) -> bool:
    from ..correct.bias import DATA_MODES

    return config.bias_correction in DATA_MODES


def _resolve(config: PTQConfig, details: Details) -> PTQConfig:
    """``"auto"`` → ``"affine"`` or ``False``: what it did on this model (its record's mode)."""
    if config.bias_correction != "auto":
        return config
    mode = details.get("bias_correction", {}).get("mode")
    return config.replace(bias_correction="affine" if mode == "affine" else False)


BIAS_CORRECTION = register(
    Technique(
        "bias_correction",
        800,
        _bias_correction,
        enabled=lambda c: bool(c.bias_correction),
        fields=("bias_correction", "bias_correction_options"),
        options=BiasCorrectionOptions,
        tap=_tap,
        needs_tap=_needs_tap,
        share_tap=lambda c: c.replace(bias_correction="affine"),  # means and rows: every mode
        cost_key=lambda c: f"bias_correction:{c.bias_correction}",
        prior_passes={
            "bias_correction:analytic": 0.2,
            "bias_correction:empirical": 1.0,
            "bias_correction:affine": 1.0,
        },
        candidates=(
            Candidate("affine BC", {"bias_correction": "affine"}, rank=20),
            Candidate("empirical BC", {"bias_correction": "empirical"}, rank=50),
            Candidate("analytic BC", {"bias_correction": "analytic"}, rank=60),
            Candidate("no BC", {"bias_correction": False}, rank=90),
        ),
        resolve=_resolve,
        reference="Nagel et al. 2019, arXiv:1906.04721",
        per_layer=True,
    )
)
