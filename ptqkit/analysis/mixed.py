"""Mixed precision by measured sensitivity: per-layer weight bit widths under a bit budget.

Given a budget of ``B`` bits per weight on average (weighted by each layer's parameter count
``n_l``; or a size budget of ``S`` bytes of weight integers, ``B = 8·S / Σ n_l``) and a set of
widths (default ``{4, 8}``), :func:`mixed_precision` chooses each quantized Conv/Linear's width
``b_l`` to solve the integer program of HAWQ-V3 (Yao et al. 2021, "HAWQ-V3: Dyadic Neural
Network Quantization", arXiv:2011.10680), with the measured output error in place of
its Hessian-trace proxy::

    minimize  Σ_l Δ_l(b_l)   subject to   Σ_l n_l·b_l <= B·Σ_l n_l,   b_l in choices

``Δ_l(b)`` is measured, not estimated: the model is quantized with every layer at ``b`` bits
(the ``base`` config otherwise: its activations, calibrator, GPTQ/AWQ, bias correction), then
scored with *only* layer ``l``'s unit quantized (its weights at ``b`` bits and its activation
quantizers; every other unit float, :func:`ptqkit.correct.units.precision`) against the FP32
model on the user's data, by the one scorer (:mod:`ptqkit.scorer`), as the relative output
noise energy ``Δ_l(b) = Σ (f - q)² / Σ f² = 10^(-SQNR_l(b)/10)``. Summing them assumes the
layers' output errors add (uncorrelated noise: HAWQ's and the float fallback's assumption).
Cost: ``|choices|`` quantizations and ``|choices|·L`` scored passes over the data.

The program is solved exactly by dynamic programming (a multiple-choice knapsack,
:func:`ptqkit.analysis.allocation.allocate`; the record and the allocation live there), never
over the budget. A layer whose ``Δ`` is the same at two widths takes the lower. The sum
assumes the errors add; where layers interact they do not, so the allocation is then checked
on the whole model: quantized with its widths, its measured output noise is compared with each
uniform assignment that fits the budget (measured on the way, one pass each), and the best
uniform one is kept, and said so in the plan's ``note``, when it measures lower (one more
quantization and two passes). On the data it was measured on, the plan is never worse than a
uniform assignment of the choices that fits the budget.

Why a function that returns a config, and not a technique of the registry: a technique is one
step of one :func:`ptqkit.quantize` run on one copy of the model, while choosing the widths
takes several quantizations of the model (one per width) and decides the layers' weight specs,
which the capture step fixes before any technique runs. So the choice is a config, like
:func:`ptqkit.tune`'s: per-layer :class:`~ptqkit.Scope` objects (one per chosen spec, a
regular expression of the exact layer names), which quantize, save, load and export already
honour. The typed record (:class:`MixedPrecisionPlan`) rides in ``config.techniques`` under
``"mixed_precision"``; a registered technique that only records
(:data:`ptqkit.techniques.mixed_precision.TECHNIQUE`) puts it, with the widths the layers
really got, in ``ptq_info.details["mixed_precision"]``; the report's summary lists the
scopes. That technique, its plan and :func:`plan_of` live in ``ptqkit/techniques/`` with every
other technique, so a config read back from a file that holds a plan quantizes again in a
fresh process without importing this module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import PTQConfig
from ..correct.scoring import Evaluator
from ..errors import ConfigError, DataError, ModelError
from ..progress import progress
from ..quant.modules import quant_layers
from ..scorer import OutputSelector
from ..spec import QuantSpec, Scope
from ..techniques.mixed_precision import (
    DEFAULT_BUDGET_BITS,
    NAME,
    LayerBits,
    MixedPrecisionPlan,
    check_choices,
    plan_of,
)
from .allocation import allocate, check_budget


def layer_spec(bits: int, symmetric: bool, group_size: int | None) -> QuantSpec:
    """The weight spec of a layer at ``bits``: per output channel, optionally group-wise."""
    return QuantSpec(bits=bits, symmetric=symmetric, per_channel=True, group_size=group_size)


def scopes_for(specs: dict[str, QuantSpec]) -> tuple[Scope, ...]:
    """One :class:`Scope` per distinct spec, matching exactly the layers that take it (a
    ``re:`` pattern of their escaped names: no glob, no class name can match another)."""
    by_spec: dict[QuantSpec, list[str]] = {}
    for name, spec in specs.items():
        by_spec.setdefault(spec, []).append(name)
    return tuple(
        Scope("re:(?:" + "|".join(re.escape(n) for n in names) + ")", weights=spec)
        for spec, names in by_spec.items()
    )


def _one_shot(data: Iterable[Any]) -> bool:
    """A generator or other iterator: a second pass would find it exhausted."""
    return iter(data) is data


def _noise(sqnr_db: float) -> float:
    """``Σ (f - q)² / Σ f²`` from the SQNR in dB (``inf`` when undefined)."""
    return math.inf if math.isnan(sqnr_db) else 10.0 ** (-sqnr_db / 10.0)


@dataclass
class _Measured:
    names: list[str]
    params: list[int]
    symmetric: dict[str, bool]
    errors: list[list[float]]  # Δ_l(b), per layer, per choice
    uniform: list[float]  # the whole model's output noise with every layer at each choice
    samples: int


def _plain(base: PTQConfig) -> PTQConfig:
    """``base`` as the measurements run it: no fallback, and no earlier plan (its record
    would warn)."""
    return base.replace(
        max_degradation=None,
        min_sqnr_db=None,
        techniques={k: v for k, v in base.techniques.items() if k != NAME},
    )


def _scored(qmodel: nn.Module, data: Iterable[Any], plain: PTQConfig, output: Any) -> Evaluator:
    ev = Evaluator(qmodel, data, plain, output, "mixed_precision")
    if ev.discrete:
        raise DataError(
            "mixed precision scores the output's noise energy, but the model returns integer "
            "or bool predictions; select a float output with output=..."
        )
    return ev


def measure(
    model: nn.Module,
    data: Iterable[Any],
    base: PTQConfig,
    choices: tuple[int, ...],
    group_size: int | None,
    output: OutputSelector = None,
) -> _Measured:
    """``Δ_l(b)`` for every quantized layer ``l`` of ``model`` under ``base`` and every ``b``
    of ``choices`` (module docstring), with each layer's weight count and symmetry."""
    from ..pipeline import quantize

    plain = _plain(base)
    first = quantize(
        model,
        data,
        plain.replace(weights=layer_spec(choices[0], base.weights.symmetric, group_size)),
    )
    layers = quant_layers(first)
    if not layers:
        raise ModelError("mixed precision: the model has no quantized Conv/Linear layer")
    names = list(layers)
    symmetric = {n: m.spec.symmetric for n, m in layers.items()}
    params = [int(layers[n].weight_fp.numel()) for n in names]
    errors: list[list[float]] = [[] for _ in names]
    uniform: list[float] = []
    samples = 0
    for b in choices:
        specs = {n: layer_spec(b, symmetric[n], group_size) for n in names}
        same = b == choices[0] and all(layers[n].spec == specs[n] for n in names)
        qmodel = (
            first
            if same
            else quantize(model, data, plain.replace(scopes=plain.scopes + scopes_for(specs)))
        )
        ev = _scored(qmodel, data, plain, output)
        samples = ev.samples
        uniform.append(_noise(ev.measure().sqnr_db))
        for k, n in enumerate(progress(names, base.progress, f"mixed precision: W{b}")):
            errors[k].append(_noise(ev.measure(only=[n]).sqnr_db))
    return _Measured(names, params, symmetric, errors, uniform, samples)


def _checked(
    model: nn.Module,
    data: Iterable[Any],
    base: PTQConfig,
    m: _Measured,
    chosen: list[int],
    choices: tuple[int, ...],
    budget: int,
    group_size: int | None,
    output: OutputSelector,
) -> tuple[list[int], float, str]:
    """The allocation checked against the uniform assignments that fit the budget, on the
    whole model's measured output noise (the sum ``Σ Δ`` assumes additive errors, which layers
    that interact break): ``(widths, measured noise, note)``, the best uniform one (and why)
    when it measures lower than the allocation."""
    from ..pipeline import quantize

    if len(set(chosen)) == 1:
        return chosen, m.uniform[choices.index(chosen[0])], ""
    specs = {n: layer_spec(b, m.symmetric[n], group_size) for n, b in zip(m.names, chosen)}
    plain = _plain(base)
    qmodel = quantize(model, data, plain.replace(scopes=plain.scopes + scopes_for(specs)))
    err = _noise(_scored(qmodel, data, plain, output).measure().sqnr_db)
    fits = [j for j, b in enumerate(choices) if b * sum(m.params) <= budget]
    j = min(fits, key=lambda j: m.uniform[j])
    if m.uniform[j] < err:
        note = (
            f"uniform W{choices[j]}: its measured output noise {m.uniform[j]:.4g} is below the "
            f"allocation's {err:.4g} (Σ Δ predicted the opposite: the layers' errors interact)"
        )
        return [choices[j]] * len(chosen), m.uniform[j], note
    return chosen, err, ""


def _check_inputs(
    data: Iterable[Any],
    budget_bits: float | None,
    budget_bytes: int | None,
    bits: tuple[int, ...],
    group_size: int | None,
) -> float:
    """What can be checked before any work; the bits-per-weight budget (the default when
    ``budget_bytes`` is given: that one is checked once the weights are counted)."""
    if budget_bits is not None and budget_bytes is not None:
        raise ConfigError("mixed precision: give budget_bits or budget_bytes, not both")
    avg = DEFAULT_BUDGET_BITS
    if budget_bytes is None:
        avg = check_budget(avg if budget_bits is None else budget_bits, bits, "budget_bits")
    elif isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
        raise ConfigError(
            f"mixed precision: budget_bytes must be an int >= 1, got {budget_bytes!r}"
        )
    layer_spec(bits[0], True, group_size)  # a bad group_size is a ConfigError of QuantSpec
    if _one_shot(data):
        raise DataError(
            "mixed precision reads the data several times; pass a list of batches "
            f"or a DataLoader, not a one-shot {type(data).__name__}"
        )
    return avg


def mixed_precision(
    model: nn.Module,
    data: Iterable[Any],
    budget_bits: float | None = None,
    choices: Iterable[int] = (4, 8),
    base: PTQConfig | None = None,
    *,
    budget_bytes: int | None = None,
    group_size: int | None = None,
    output: OutputSelector = None,
) -> PTQConfig:
    """``base`` with per-layer weight widths chosen from ``choices`` under a budget, by measured
    sensitivity (module docstring: the program, how ``Δ`` is measured, why a config).

    Args:
        model: the float model.
        data: calibration batches (a list or a DataLoader: it is read several times).
        budget_bits: bits per weight on average over the quantized layers, weighted by their
            weight counts (default :data:`DEFAULT_BUDGET_BITS`); or give ``budget_bytes``.
        choices: the widths a layer may take (ints in 2..16).
        base: every other setting (default ``PTQConfig()``); its fallback target, if any, is
            kept in the returned config but not used while measuring.
        budget_bytes: bytes of weight integers in all (``Σ n_l·b_l / 8``, as ptqkit packs them;
            scales not counted), instead of ``budget_bits``.
        group_size: group-wise scales along each layer's input dimension (per-channel without).
        output: the tensor of the model's output to score, as in :func:`ptqkit.evaluate`.

    Returns:
        A :class:`PTQConfig`: ``base.scopes`` followed by one scope per chosen spec, covering
        every quantized layer, and the :class:`MixedPrecisionPlan` in
        ``techniques["mixed_precision"]`` (:func:`plan_of`), which ``ptqkit.quantize`` records
        in ``ptq_info.details["mixed_precision"]``.

    Raises:
        ConfigError: empty ``choices``, a width outside 2..16, a budget below the smallest or
            above the largest choice, both budgets given, a bad ``group_size``.
    """
    base = PTQConfig() if base is None else base
    if not isinstance(base, PTQConfig):
        raise ConfigError(f"mixed precision: base must be a PTQConfig, got {type(base).__name__}")
    bits = check_choices(choices)
    avg = _check_inputs(data, budget_bits, budget_bytes, bits, group_size)
    m = measure(model, data, base, bits, group_size, output)
    total = sum(m.params)
    if budget_bytes is None:
        budget = math.floor(avg * total)
    else:
        budget = 8 * budget_bytes
        what = f"budget_bytes={budget_bytes} over {total} weights"
        avg = check_budget(budget / total, bits, what)
    chosen = allocate(m.params, m.errors, bits, budget)
    chosen, measured, note = _checked(
        model, data, base, m, chosen, bits, budget, group_size, output
    )
    plan = MixedPrecisionPlan(
        budget_bits=avg,
        choices=bits,
        group_size=group_size,
        layers=tuple(
            LayerBits(n, p, b, tuple(e)) for n, p, b, e in zip(m.names, m.params, chosen, m.errors)
        ),
        samples=m.samples,
        budget_bytes=budget_bytes,
        measured_error=measured,
        uniform_errors=tuple(m.uniform),
        note=note,
    )
    specs = {n: layer_spec(b, m.symmetric[n], group_size) for n, b in zip(m.names, chosen)}
    return base.replace(
        scopes=base.scopes + scopes_for(specs), techniques={**base.techniques, NAME: plan}
    )


#: the plan's names (ptqkit.techniques.mixed_precision) stay importable from here too
__all__ = [
    "NAME",
    "MixedPrecisionPlan",
    "allocate",
    "check_budget",
    "layer_spec",
    "measure",
    "mixed_precision",
    "plan_of",
]
