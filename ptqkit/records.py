"""The typed records the techniques of :func:`ptqkit.quantize` leave in ``ptq_info.details``.

:class:`Details` lists every key a module of ptqkit may write, with the type of its value, so
that mypy checks each write and each read (a misspelt key or a wrong value is a type error).
At run time a record is a plain ``dict`` (``TypedDict``): ``ptqkit.save`` writes it as JSON
and ``ptqkit.load`` reads it back unchanged, so files saved before these types existed load
as they did. A record says what happened, for the user, the report and the advice; no stage
reads one as its input: values that flow between stages travel on the typed
:class:`ptqkit.stage.Context` (e.g. the capture's layout, ``Context.channels_last``).

Every record is ``total=False``: a technique that stops early (nothing to do, skipped) writes
only the keys that say why.
"""

from __future__ import annotations

from typing import Any, TypedDict

#: a range the KL guard replaced (:mod:`ptqkit.calibrate.calibrators`): the calibrator it came
#: ``from``, the one used instead (``to``), the largest share of a channel's energy the replaced
#: range clipped (``clipped_energy``), how many ``channels`` it replaced, and the ``quantizer``
RangeFallback = TypedDict(
    "RangeFallback",
    {"from": str, "to": str, "clipped_energy": float, "channels": int, "quantizer": str},
)


class AutoRecord(TypedDict, total=False):
    """``calibration="auto"`` (:mod:`ptqkit.calibrate.auto`): per quantizer the candidate
    range of least error, the error ``E = mean over batches of ||f(Q(x)) - f(x)||²``."""

    batches: int  # calibration batches the errors were measured on (summed over ranks)
    scored_on: dict[str, str]  # quantizer -> "layer outputs" | "tensor" (where E is measured)
    errors: dict[str, dict[str, float]]  # quantizer -> calibrator -> mean error per batch


class RangeMarginRecord(TypedDict, total=False):
    """``range_margin`` (:mod:`ptqkit.calibrate.margin`): each range widened by
    ``margin·(hi - lo)`` on each side."""

    margin: float
    quantizers: int  # how many activation quantizers were widened


class DistributedRecord(TypedDict, total=False):
    """A calibration under ``torch.distributed`` (:mod:`ptqkit.calibrate.distributed`): the
    same on every rank, so that every rank saves the same bytes."""

    world_size: int
    backend: str
    batches_per_rank: list[int]  # rank r's own batches: batches_per_rank[r]
    samples_per_rank: list[int]
    rank_local: list[str]  # record fields still differing between ranks (rank 0's kept)


class CLERecord(TypedDict, total=False):
    """Cross-layer equalization with bias absorption (Nagel et al. 2019,
    :mod:`ptqkit.equalize.cle`)."""

    pairs: list[dict[str, object]]  # {first, second, activation, scale_min/max, absorbed_max}
    sweeps: int  # equalization sweeps until the scales converged
    absorbed_pairs: int  # pairs whose high bias was absorbed into the next layer
    clamps_installed: int  # ReLU6 turned into clamps at the rescaled bound
    not_paired: dict[str, str]  # layer -> why it has no partner
    skipped: str  # why CLE did not run (an untraced model)
    off_by_scope: dict[str, str]  # layer -> the scope that turns CLE off for it


class SmoothQuantRecord(TypedDict, total=False):
    """SmoothQuant (Xiao et al. 2023, :mod:`ptqkit.equalize.smoothquant`): per input channel
    ``s = max|X|^α / max|W|^(1-α)`` moved from the activations into the weights."""

    alpha: float
    layers: dict[str, str]  # Linear -> how its scale was applied (or why it was not smoothed)
    extra_data_pass_batches: int  # batches of the statistics pass it ran
    scale_range: list[float]  # [min s, max s] over every smoothed channel
    fp32_max_rel_change: float  # relative change of the FP32 output (must stay ~0)
    off_by_scope: dict[str, str]  # Linear -> the scope that turns SmoothQuant off for it


class AWQRecord(TypedDict, total=False):
    """AWQ (Lin et al. 2024, :mod:`ptqkit.techniques.awq`): per Linear the grid point ``α`` of
    ``s = mean|x|^α`` that gave the least output error."""

    grid: int  # points of the α grid in [0, 1)
    layers: dict[str, dict[str, Any]]  # Linear -> {alpha, error, error_nearest, how}
    off_by_scope: dict[str, str]  # Linear -> the scope that turns AWQ off for it


class GPTQRecord(TypedDict, total=False):
    """GPTQ (Frantar et al. 2022, :mod:`ptqkit.correct.gptq`)."""

    layers: dict[str, dict[str, Any]]  # layer -> {rows, dead_inputs, damp, rtn, gptq} | skipped
    options: dict[str, Any]  # damp, block_size, act_order, samples
    weight_calibration: str
    engine: dict[str, Any]  # cached_inputs, and the one-pass walk's counts when it ran
    off_by_scope: dict[str, str]  # layer -> the scope that turns GPTQ off (nearest rounding)


class AdaRoundRecord(TypedDict, total=False):
    """AdaRound (Nagel et al. 2020, :mod:`ptqkit.correct.adaround`), per layer, or block
    reconstruction (BRECQ, Li et al. 2021, :mod:`ptqkit.correct.brecq`)."""

    layers: dict[str, dict[str, Any]]  # layer -> its fit (or {"block": k}, or skipped)
    iters: int
    weight_calibration: str
    engine: dict[str, Any]  # cached_inputs (one-pass walk or per-layer prefix), samples
    granularity: str  # "block" for block reconstruction (absent: per layer)
    blocks: list[dict[str, Any]]  # block reconstruction: one record per block
    off_by_scope: dict[str, str]  # layer -> the scope that turns AdaRound off (nearest)


class BiasCorrectionRecord(TypedDict, total=False):
    """Bias correction (Nagel et al. 2019, section 4.2; :mod:`ptqkit.correct.bias`): per layer
    the bias shift ``-E[ε·x]`` (and, ``"affine"``, a least-squares scale per channel)."""

    mode: str  # "empirical" | "affine" | "analytic" | "auto" (skipped: see ``skipped``)
    corrected: dict[str, float]  # layer -> max |bias shift|
    skipped: str  # why "auto" did nothing
    passes: int  # passes over the data (the calibration pass's tap counts as one)
    engine: dict[str, Any]  # the one-pass walk: batches, spilled, ...
    scaled: dict[str, list[float]]  # "affine": layer -> [min a, max a] of its channel scales
    bias_only: dict[str, str]  # "affine": layer -> why it got a bias only
    not_corrected: dict[str, str]  # layer -> why not
    checked: dict[str, dict[str, Any]]  # layer -> the check of its correction on held rows
    rejected: dict[str, str]  # layer -> why its correction was not kept
    left_out_samples: int  # outlier samples left out of the means
    assumes: str  # "analytic": what the data-free correction assumes
    off_by_scope: dict[str, str]  # layer -> the scope that turns bias correction off for it


#: the accuracy fallback (:mod:`ptqkit.correct.fallback`): layers kept in float until the
#: ``target`` (``max_degradation`` or ``min_sqnr_db``, and the ``metric``) is met; ``float``:
#: the float model's metric; ``before``/``after``: ``sqnr_db`` (and the metric) before any layer
#: went back to float and at the end; ``samples`` measured on; ``met``; ``kept_float``: the
#: layers kept in float, in the order chosen; ``passes`` over the data; ``off_by_scope``: layer
#: -> the scope that turns the fallback off for it (never measured nor kept in float)
FallbackRecord = TypedDict(  # noqa: UP013 (a key "float": the class body would shadow the type)
    "FallbackRecord",
    {
        "target": dict[str, Any],
        "float": float,
        "before": dict[str, float],
        "after": dict[str, float],
        "samples": int,
        "met": bool,
        "kept_float": list[Any],
        "passes": int,
        "off_by_scope": dict[str, str],
    },
    total=False,
)


class RecipeRecord(TypedDict, total=False):
    """:func:`ptqkit.tune` (:mod:`ptqkit.recipe.search`): every recipe tried and the one
    chosen (``PTQInfo.recipe`` says it in one line)."""

    chosen: str
    changes: dict[str, Any]  # the chosen recipe's config fields that differ from the base
    score: str  # the ranking the held-out samples were scored on ("sqnr", "agreement", ...)
    held_out_samples: int
    held_out_batches: int
    calibration_batches: int
    budget_s: float
    seconds: float
    final: str  # how the returned model was made (re-quantized on all batches, or the trial's)
    refit: bool  # whether it was re-quantized on all the data (False: held-out samples unused)
    trials: list[dict[str, Any]]  # {name, changes, status, reason, scores, decision, ...}
    note: str
    over_budget_s: float  # seconds past the budget, when over


class MixedPrecisionRecord(TypedDict, total=False):
    """Mixed precision (:func:`ptqkit.mixed_precision`, :mod:`ptqkit.analysis.mixed`; recorded
    by :mod:`ptqkit.techniques.mixed_precision`): the widths chosen per layer to minimize
    ``Σ_l Δ_l(b_l)`` under a bits-per-weight budget, and the whole model's measured noise."""

    budget_bits: float
    budget_bytes: int | None  # the byte budget the bits came from, if one was given
    choices: list[int]  # the widths a layer could get
    group_size: int | None
    samples: int  # samples each ``Δ_l(b)`` was measured on
    average_bits: float
    predicted_error: float  # ``Σ_l Δ_l(b_l)`` of the plan
    #: the whole model's output noise ``Σ (f - q)² / Σ f²`` with the plan's widths, measured
    measured_error: float | None
    uniform_errors: list[float]  # the same with every layer at each choice (as ``choices``)
    note: str  # why the plan is uniform when the allocation was not (it measured worse), or ""
    layers: list[dict[str, Any]]  # {name, params, bits, errors (one per choice)}
    realized_bits: dict[str, int | None]  # layer -> the width it really got (None: not found)


class Details(TypedDict, total=False):
    """``PTQInfo.details``: one key per technique that ran, plus a few capture facts."""

    #: whether the capture check passed with channels-last inputs (the calibration pass then
    #: ran in that layout: :mod:`ptqkit.capture.verify`); the value flows on
    #: ``Context.channels_last``, this is its record
    channels_last: bool
    unparametrized: list[str]  # "module.tensor (Parametrization)" removed (capture)
    state_restored: int  # values of the user's state put back at the end (capture/state.py)
    auto: AutoRecord
    range_fallback: dict[str, RangeFallback]  # quantizer label -> the range KL gave up
    range_margin: RangeMarginRecord
    distributed: DistributedRecord
    cle: CLERecord
    smoothquant: SmoothQuantRecord
    awq: AWQRecord
    gptq: GPTQRecord
    adaround: AdaRoundRecord
    bias_correction: BiasCorrectionRecord
    fallback: FallbackRecord
    recipe: RecipeRecord
    mixed_precision: MixedPrecisionRecord


__all__ = [
    "AWQRecord",
    "AdaRoundRecord",
    "AutoRecord",
    "BiasCorrectionRecord",
    "CLERecord",
    "Details",
    "DistributedRecord",
    "FallbackRecord",
    "GPTQRecord",
    "MixedPrecisionRecord",
    "RangeFallback",
    "RangeMarginRecord",
    "RecipeRecord",
    "SmoothQuantRecord",
]
