"""``ptqkit.tune``: try recipes on held-out calibration samples, keep the best, within a budget.

No labels and no evaluation function are needed: every recipe is scored against the float
model itself (:mod:`ptqkit.recipe.holdout`). The search (Intel Neural Compressor's
accuracy-driven tuning without its user-written eval function):

1. the last ``holdout`` share of ``data`` (whole batches; the samples of the only batch when
   there is one; cut by samples when whole batches would leave fewer than the chapter's
   100 calibration samples that the data has, see :func:`~.holdout.split`) is held out for
   scoring; the rest calibrates;
2. the base recipe (``config``, default :class:`PTQConfig`) runs first, always;
3. each :class:`~ptqkit.recipe.Candidate` (default :data:`~ptqkit.recipe.CANDIDATES`,
   cheapest first) is applied to the best recipe so far and kept only if its per-sample
   losses on the held-out samples are significantly lower than the best's and not
   significantly higher than the base's, paired (:mod:`ptqkit.recipe.decide`: a tie keeps
   the incumbent, so no chain of ties walks away from the base). A recipe identical to
   one already measured is not run again, nor one that does not apply to the model
   (``Candidate.applies`` on the base trial's layers, :mod:`ptqkit.recipe.view`: e.g.
   dynamic activations for a CNN, GPTQ for 8-bit weights), recorded with the reason;
4. a candidate whose expected time (from the measured times of the earlier trials, see
   :mod:`ptqkit.recipe.candidates`; AdaRound's from its layers' weights and this machine's
   measured rates, :mod:`ptqkit.correct.cost`) would not fit in what is left of
   ``budget_s`` is skipped, with the reason recorded; the base recipe runs whatever the
   budget;
5. if ``config`` sets ``max_degradation`` or ``min_sqnr_db``, the float fallback of the
   fewest layers meeting that target (:mod:`ptqkit.correct.fallback`) is added to the best
   recipe last (the target is not used by the earlier trials);
6. with ``refit`` (default) the best recipe is quantized again on *all* of ``data``.

The trials share their common work (:mod:`ptqkit.recipe.prefix`): the capture and the
calibration pass run once per distinct capture (CLE on/off, ...), collecting histograms
every histogram or min/max calibrator solves from, and the float layer means empirical bias
correction needs; a trial then costs its range solve, its optional stages and its scoring.
Each trial's model is still exactly the one :func:`ptqkit.quantize` gives for its recipe
(``ema`` and other observers run the whole pipeline; ``calibration_pass`` in each trial's
record says which: ``built``, ``shared`` or ``own``). Under ``torch.distributed`` every
trial runs the whole pipeline; each rank holds out part of its own shard, the scores are
summed over the ranks' held-out samples, and each decision on time (does a trial fit, the
refit) is rank 0's and sent to the others: every rank runs the same trials and returns the
same model, with rank 0's record (two ranks with different shards chose different recipes
before, and the second trial's calibration refused the mismatch).

Why refit: the held-out samples were needed to choose, not to calibrate; once the choice is
made, every sample helps the ranges and the bias estimates (a quarter more data by default),
and the recipe, not the particular model, is what was measured. The score recorded is the
one measured on the held-out samples by the model calibrated without them (scoring the refit
model on them would not be a held-out measurement). The refit is the optional last step: no
time is reserved for it (on a large model one trial costs about as much as the refit, and a
recipe tried is worth more than a quarter more calibration data), so when what is left of the
budget cannot pay for it, or with ``refit=False``, the best trial model is returned as it
was measured, and ``ptq_info`` says so. One exception: when the data meets the chapter's
minimum of calibration samples (:data:`~ptqkit.info.MIN_CALIBRATION_SAMPLES`) but its
calibration share does not (100 to 133 samples with the default ``holdout``), a trial is
run only if the refit still fits after it: tune does not turn enough data into a model
calibrated on too few.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..analysis.outputs import OutputSelector
from ..config import PTQConfig
from ..data import batch_size, split_batch
from ..errors import ConfigError, DataError, PTQError, PTQWarning
from ..info import MIN_CALIBRATION_SAMPLES, info_of, sample_shortfall
from ..pipeline import quantize
from ..sync import active, from_first, guard
from ..techniques import candidates as registered_candidates
from .candidates import Candidate
from .holdout import HoldOut, split
from .prefix import servable
from .trials import Search, config_delta, config_key, plain

_TARGETS = ("max_degradation", "min_sqnr_db")


def _as_candidates(candidates: Sequence[Any] | None) -> list[Candidate]:
    if candidates is None:  # the registered ones, plugins included
        return list(registered_candidates())
    out = []
    for c in candidates:
        if isinstance(c, Candidate):
            out.append(c)
        elif isinstance(c, (tuple, list)) and len(c) == 2:
            out.append(Candidate(c[0], c[1]))
        else:
            raise ConfigError(
                f"candidates must be ptqkit.recipe.Candidate objects or (name, changes) pairs, "
                f"got {c!r}"
            )
    return out


def _materialize(data: Iterable[Any], num_batches: int | None) -> list[Any]:
    if isinstance(data, (torch.Tensor, dict)):
        raise DataError(
            f"data must be an iterable of batches, not a single {type(data).__name__}; wrap it "
            "in a list: [x]"
        )
    try:
        it = iter(data)
    except TypeError:
        raise DataError(f"data must be iterable, got {type(data).__name__}") from None
    batches = []
    for i, b in enumerate(it):
        if num_batches is not None and i >= num_batches:
            break
        split_batch(b, i)  # a DataError names a batch of the wrong kind
        batches.append(b)
    return batches


def tune(
    model: nn.Module,
    data: Iterable[Any],
    config: PTQConfig | None = None,
    *,
    budget_s: float = 120.0,
    holdout: float = 0.25,
    score: str = "auto",
    candidates: Sequence[Candidate | tuple[str, dict[str, Any]]] | None = None,
    refit: bool = True,
    output: OutputSelector = None,
) -> nn.Module:
    """Quantize ``model`` with the best recipe found on held-out calibration samples, within
    ``budget_s`` seconds: the search, the sharing of work between trials, the decision rule
    and the refit are described in :mod:`ptqkit.recipe.search`.

    Args:
        model: the float model (left untouched).
        data: calibration batches, as for :func:`ptqkit.quantize`; iterated into a list (it is
            used by every trial). ``config.num_batches`` limits it first.
        config: the base recipe; its fallback target, if any, is applied last (step 5).
        budget_s: seconds for the whole call (trials, scoring, refit), > 0.
        holdout: share of the data held out for scoring, in (0, 1).
        score: ``"auto"``, ``"agreement"`` or ``"kl"`` (per-sample KL decides, and top-1
            agreement must not drop significantly), or ``"sqnr"`` (per-sample squared output
            error, for outputs that are not class scores).
        candidates: the recipes to try after the base one, in order.
        refit: quantize the chosen recipe again on all of ``data`` (see above).
        output: which tensor of the model's output to score (as in :func:`ptqkit.evaluate`).

    Returns:
        The quantized model. ``qmodel.ptq_info.recipe`` says in one line what was chosen and
        how; ``qmodel.ptq_info.details["recipe"]`` lists every recipe (``name``, ``changes``,
        ``status`` ran/skipped/failed, ``agreement``, ``kl``, ``sqnr_db``, ``seconds``, or the
        ``reason`` it was skipped or failed) and the chosen one.

    Raises:
        DataError: data that cannot be split into calibration and held-out samples.
        ConfigError: a bad ``budget_s``, ``holdout``, ``score`` or candidate.
        PTQError: the base recipe itself fails (a failing candidate is recorded and skipped).
    """
    config = _checked(config, budget_s)
    cands = _as_candidates(candidates)
    t_start = time.perf_counter()
    with guard("tune: the data"):  # a rank whose shard cannot be split stops every rank
        batches = _materialize(data, config.num_batches)
        # under torch.distributed the model is calibrated on every rank's share: the
        # per-rank minimum does not apply
        calib, held_batches = split(batches, holdout, 0 if active() else MIN_CALIBRATION_SAMPLES)
        held = HoldOut(model, held_batches, score, output)
    n_all = sum(batch_size(*split_batch(b, i)) for i, b in enumerate(batches))
    n_cal = n_all - held.samples
    base = config.replace(max_degradation=None, min_sqnr_db=None, progress=False)
    search = Search(model, calib, held, float(budget_s))
    search.t0 = t_start
    search.run("base", {}, base)
    scale = n_all / max(n_cal, 1) if refit else 0.0
    # the split alone would leave the returned model under the chapter's minimum of samples
    # that the user's data meets: the refit is then reserved out of the budget (see above)
    trial = _Trials(search, scale, refit and n_cal < MIN_CALIBRATION_SAMPLES <= n_all)
    for cand in cands:
        _try(search, trial, cand)
    target = {k: getattr(config, k) for k in _TARGETS if getattr(config, k) is not None}
    fallback_note = ""
    if target:  # asked for: the fallback model is kept even if its held-out score is not
        assert search.best is not None  # higher (it meets the target on the calibration data)
        cfg = search.best[1].replace(**target)
        if not trial.attempt("fallback", plain(target), cfg, force=True):
            why = search.trials[-1]["reason"]
            fallback_note = f"the fallback target {target} was not pursued: {why}"
    return _finish(search, model, batches, config, base, refit, scale, fallback_note)


def _try(search: Search, trial: _Trials, cand: Candidate) -> None:
    """One candidate, applied to the best recipe so far: recorded as skipped when it does not
    apply to this model, as failed when it cannot be applied, else attempted."""
    assert search.best is not None
    why = cand.skip_reason(search.view, search.best[1])
    if why is not None:  # a candidate that cannot apply to this model is not tried
        search.record(cand.name, dict(cand.changes), "skipped", f"does not apply: {why}")
        return
    try:
        cfg = cand.apply(search.best[1])
    except ConfigError as e:
        search.record(cand.name, dict(cand.changes), "failed", str(e))
        return
    trial.attempt(cand.name, config_delta(search.best[1], cfg), cfg)


def _checked(config: PTQConfig | None, budget_s: Any) -> PTQConfig:
    config = PTQConfig() if config is None else config
    if not isinstance(config, PTQConfig):
        raise ConfigError(f"config must be a PTQConfig, got {type(config).__name__}")
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not budget_s > 0:
        raise ConfigError(f"budget_s must be a positive number of seconds, got {budget_s!r}")
    return config


class _Trials:
    """Runs one candidate of a search if it is new and fits in what is left of the budget
    (with the refit's time kept aside when ``reserve``), recording why not otherwise."""

    def __init__(self, search: Search, scale: float, reserve: bool) -> None:
        self.search, self.scale, self.reserve = search, scale, reserve

    def fits(self, cfg: PTQConfig) -> tuple[float, str | None]:
        """The trial's expected seconds, and why it does not fit (``None`` if it does)."""
        search = self.search
        expected = search.quantize_estimate(cfg) + search.score_s
        left = search.budget_s - search.elapsed()
        kept = 0.0  # the refit of this candidate or of the best so far, whichever is chosen
        if self.reserve:
            assert search.best is not None
            kept = max(
                _refit_s(search, cfg, self.scale), _refit_s(search, search.best[1], self.scale)
            )
        if expected + kept <= left:
            return expected, None
        why = f"expected {expected:.1f} s" + (f" + {kept:.1f} s kept for the refit" if kept else "")
        return expected, f"{why}, {left:.1f} s left"

    def attempt(
        self, name: str, changes: dict[str, Any], cfg: PTQConfig, force: bool = False
    ) -> bool:
        """Run the trial ``name``; whether it ran."""
        search = self.search
        key = config_key(cfg)
        if key in search.seen:
            search.record(name, changes, "skipped", f"same recipe as {search.seen[key]!r}")
            return False
        # a decision on time is rank 0's (torch.distributed): every rank runs the same trials
        expected, skip = from_first(f"tune: does {name!r} fit", lambda: self.fits(cfg))
        stages = {k: round(v, 3) for k, v in search.stage_estimates(cfg).items()}
        if skip is not None:
            search.record(name, changes, "skipped", skip)
            search.trials[-1].update(expected_s=round(expected, 3), expected_stage_s=stages)
            return False
        try:
            rec = search.run(name, changes, cfg, force)
        except PTQError as e:
            search.record(name, changes, "failed", f"{type(e).__name__}: {e}")
            return False
        rec.update(expected_s=round(expected, 3), expected_stage_s=stages)
        return True


def _chosen_name(trials: list[dict[str, Any]], base: PTQConfig, best: PTQConfig) -> str:
    """``"mse + empirical BC"``: the accepted candidates whose changes are still in ``best``."""
    delta = config_delta(base, best)
    names = []
    for t in trials:
        kept = any(k in delta and delta[k] == v for k, v in t["changes"].items())
        if t.get("best_so_far") and kept:
            names.append(t["name"])
    return " + ".join(dict.fromkeys(names)) or "base"


def _refit_s(search: Search, config: PTQConfig, scale: float) -> float:
    """Expected seconds to quantize ``config`` again on all the data: a whole new
    :func:`~ptqkit.quantize`, with its own capture and calibration pass."""
    shared = search.prefix_s if search.share and servable(config) else 0.0
    return (search.quantize_estimate(config) + shared) * scale


def _finish(
    search: Search,
    model: nn.Module,
    batches: list[Any],
    config: PTQConfig,
    base: PTQConfig,
    refit: bool,
    scale: float,
    note: str,
) -> nn.Module:
    assert search.best is not None
    _, best_cfg, qmodel, _ = search.best
    final_cfg = best_cfg.replace(progress=config.progress)
    refit_note, refitted = "the best trial model as measured (refit=False)", False
    if refit:
        expected, left = from_first(
            "tune: refit",
            lambda: (_refit_s(search, best_cfg, scale), search.budget_s - search.elapsed()),
        )
        if expected <= left:
            qmodel = quantize(model, batches, final_cfg)
            refit_note, refitted = f"re-quantized on all {len(batches)} batches", True
        else:
            refit_note = (
                f"the best trial model as measured (refit expected {expected:.1f} s, "
                f"{left:.1f} s left)"
            )
    info = info_of(qmodel)  # updated in place below
    chosen = _chosen_name(search.trials, base, best_cfg)
    base_rec = search.trials[0]
    ran = sum(t["status"] == "ran" for t in search.trials)
    elapsed = search.elapsed()
    metric = {"agreement": "agreement", "kl": "kl", "sqnr": "sqnr_db"}[search.held.ranking]

    def fmt(rec: dict[str, Any]) -> str:
        v = rec.get(metric)
        if v is None:
            return "n/a"
        return f"{v:.2f}%" if metric == "agreement" else f"{v:.4g}"

    best_rec = next(t for t in reversed(search.trials) if t.get("best_so_far"))
    info.recipe = (
        f"chosen by ptqkit.tune: {chosen} ({metric} {fmt(best_rec)} on "
        f"{search.held.total} held-out samples, base recipe {fmt(base_rec)}); "
        f"{ran} of {len(search.trials)} recipes run in {elapsed:.1f} s (budget "
        f"{search.budget_s:g} s); {refit_note}"
    )
    info.details["recipe"] = {
        "chosen": chosen,
        "changes": config_delta(base, best_cfg),
        "score": search.held.ranking,
        "held_out_samples": search.held.total,
        "held_out_batches": len(search.held.batches),
        "calibration_batches": len(search.calib),
        "budget_s": search.budget_s,
        "seconds": round(elapsed, 3),
        "final": refit_note,
        "refit": refitted,
        "trials": search.trials,
    }
    # rank 0's record (times and what it measured) on every rank: the saved files are identical
    info.recipe, info.details["recipe"] = from_first(
        "tune: record", lambda: (info.recipe, info.details["recipe"])
    )
    if not refitted:  # the trial's warnings were held back while searching
        few = sample_shortfall(info.calibration_samples)
        info.warnings = [(info.sample_shortfall() or w) if w == few else w for w in info.warnings]
        for w in info.warnings:
            warnings.warn(w, PTQWarning, stacklevel=3)
    if note:
        info.details["recipe"]["note"] = note
        info.warn(f"tune: {note}")
    info.stages["tune"] = elapsed
    if math.isfinite(elapsed) and elapsed > search.budget_s:
        info.details["recipe"]["over_budget_s"] = round(elapsed - search.budget_s, 3)
    return qmodel
