"""One trial of :func:`ptqkit.tune`: a recipe quantized on the calibration part (from a shared
:mod:`~ptqkit.recipe.prefix` when one serves it), scored on the held-out part, recorded; and the
cost model that decides which trials still fit in the budget."""

from __future__ import annotations

import json
import time
import warnings
from typing import Any

from torch import nn

from ..config import PTQConfig
from ..correct.cost import LayerWork, Machine, adaround_seconds, layer_work, probe
from ..data import batch_size, model_device, split_batch
from ..errors import PTQWarning
from ..info import info_of
from ..pipeline import quantize
from ..sync import active
from ..technique import ModelView
from ..techniques import resolve
from ..techniques.calibrate import CALIBRATE
from .candidates import measured_stages, stage_seconds, stages_of
from .holdout import HoldOut, Score
from .prefix import Prefix, build_prefix, can_serve, quantize_from, servable
from .view import model_view


def plain(v: Any) -> Any:
    """A JSON-friendly copy of a config value (a QuantSpec or options object as a dict)."""
    if hasattr(v, "to_dict"):
        return v.to_dict()
    if hasattr(v, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(v)
    if isinstance(v, (tuple, list)):
        return [plain(x) for x in v]
    return v


def config_key(config: PTQConfig) -> str:
    """The recipe as a string: two configs with the same key give the same model."""
    return json.dumps(config.recipe(), sort_keys=True, default=str)


def config_delta(base: PTQConfig, config: PTQConfig) -> dict[str, Any]:
    """The fields ``config`` changes from ``base`` (JSON-friendly values)."""
    a, b = base.recipe(), config.recipe()
    return {k: plain(b[k]) for k in b if b[k] != a[k]}


class Search:
    """The state of one tune run: the trials so far, the measured costs, the best model."""

    def __init__(self, model: nn.Module, calib: list[Any], held: HoldOut, budget_s: float) -> None:
        self.model, self.calib, self.held, self.budget_s = model, calib, held, budget_s
        self.t0 = time.perf_counter()
        self.trials: list[dict[str, Any]] = []
        self.seen: dict[str, str] = {}
        self.measured: dict[str, float] = {}
        self.overhead_s = self.score_s = self.pass_s = 0.0
        self.layers = 0
        self.work: list[LayerWork] = []  # the base trial's layers, for AdaRound's estimate
        self.machine: Machine | None = None  # probed when AdaRound or GPTQ is first estimated
        self.view: ModelView | None = None  # the base trial's layers: candidates and costs
        self.best: tuple[str, PTQConfig, nn.Module, Score] | None = None
        self.base_score: Score | None = None  # every candidate is also compared with the base
        self.share = not active()  # prefixes: one calibration pass for many recipes
        self.prefixes: list[Prefix] = []
        self.prefix_s = 0.0  # what building a prefix cost (the first one)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def prefix_for(self, config: PTQConfig) -> Prefix | None:
        return next((p for p in self.prefixes if can_serve(p, config)), None)

    def quantize_estimate(self, config: PTQConfig) -> float:
        """Expected seconds to quantize ``config`` on the calibration part: the per-trial
        overhead, its optional stages, and a new prefix (capture + calibration pass) unless
        one already built serves it."""
        new_prefix = 0.0
        if self.share and self.prefixes and self.prefix_for(config) is None:
            new_prefix = self.prefix_s
        return self.overhead_s + new_prefix + sum(self.stage_estimates(config).values())

    def stage_estimates(self, config: PTQConfig) -> dict[str, float]:
        """Expected seconds of each optional stage ``config`` runs (by cost key)."""
        return {
            s: stage_seconds(
                s,
                config,
                self.pass_s,
                self.layers,
                self.measured,
                self.adaround_s,
                self.view,
                self.mm_rate,
            )
            for s in stages_of(config)
        }

    def mm_rate(self) -> float:
        """This machine's multiply-adds per second (probed on first use)."""
        if self.machine is None:
            self.machine = probe(model_device(self.model))
        return self.machine.mm_rate

    def adaround_s(self, config: PTQConfig) -> float:
        """Expected seconds of AdaRound's optimization for ``config`` on the base trial's layers
        (:mod:`ptqkit.correct.cost`; the machine is probed on first use)."""
        self.mm_rate()
        assert self.machine is not None
        return adaround_seconds(self.work, config, self.machine)

    def _quantize(self, config: PTQConfig) -> tuple[nn.Module, float, str]:
        """The trial model, the seconds spent building a new prefix for it (0 if reused or
        not shared), and how its calibration pass was had (``shared``, ``built``, ``own``)."""
        if not self.share or not servable(config):
            return quantize(self.model, self.calib, config), 0.0, "own"
        prefix = self.prefix_for(config)
        if prefix is not None:
            return quantize_from(prefix, config), 0.0, "shared"
        prefix = build_prefix(self.model, self.calib, config)
        self.prefixes.append(prefix)
        self.prefix_s = max(self.prefix_s, prefix.seconds)
        return quantize_from(prefix, config), prefix.seconds, "built"

    def run(
        self, name: str, changes: dict[str, Any], config: PTQConfig, force: bool = False
    ) -> dict[str, Any]:
        """Quantize on the calibration part, score on the held-out part, record; the model
        becomes the best if :meth:`HoldOut.judge` takes it (or ``force``); the first run is
        the base recipe, which every later one is also compared with."""
        rec: dict[str, Any] = {"name": name, "changes": changes}
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PTQWarning)
            qmodel, built, how = self._quantize(config)
        quantize_s = time.perf_counter() - t
        t = time.perf_counter()
        s = self.held.score(qmodel)
        score_s = time.perf_counter() - t
        stages = info_of(qmodel).stages
        ran = measured_stages(stages, config)
        for k, v in ran.items():
            self.measured[k] = max(self.measured.get(k, 0.0), v)
        # what every trial pays besides its optional stages (and a new prefix): the largest seen
        overhead = max(quantize_s - built - sum(ran.values()), 0.0)
        self.overhead_s = max(self.overhead_s, overhead) if self.trials else overhead
        if not self.trials:  # the base trial
            self.score_s, self.layers = score_s, len(info_of(qmodel).layers)
            self.work = layer_work(qmodel)
            self.pass_s = stages.get(CALIBRATE.name, quantize_s)
            samples = sum(batch_size(*split_batch(b, i)) for i, b in enumerate(self.calib))
            self.view = model_view(qmodel, self.calib, samples)
        rec.update(
            status="ran",
            **s.to_dict(),
            seconds=round(quantize_s + score_s, 3),
            quantize_s=round(quantize_s, 3),
            stage_s={k: round(v, 3) for k, v in ran.items()},
            calibration_pass=how,
            warnings=len([w for w in caught if issubclass(w.category, PTQWarning)]),
        )
        self.trials.append(rec)
        self.seen[config_key(config)] = name
        config = resolved(config, qmodel)  # "auto" bias correction: what it turned out to be
        self.seen[config_key(config)] = name
        if self.best is None:  # the base recipe
            self.base_score = s
            taken = True
        else:
            assert self.base_score is not None
            verdict = self.held.judge(s, self.best[3], self.base_score)
            rec["decision"] = verdict.reason() if not force else "kept: asked for (fallback target)"
            taken = force or verdict.taken
        if taken:
            self.best = (name, config, qmodel, s)
            rec["best_so_far"] = True
        return rec

    def record(self, name: str, changes: dict[str, Any], status: str, reason: str) -> None:
        self.trials.append({"name": name, "changes": changes, "status": status, "reason": reason})


def resolved(config: PTQConfig, qmodel: nn.Module) -> PTQConfig:
    """``config`` with each ``"auto"`` setting replaced by what it did on this model
    (``Technique.resolve``; e.g. ``bias_correction="auto"`` → ``"affine"`` or ``False``): the
    candidates that set it explicitly are then recognized as the same recipe."""
    return resolve(config, info_of(qmodel).details)


__all__ = ["Search", "config_delta", "config_key", "plain", "resolved"]
