"""How ``bench_pipeline.py`` runs one calibrator on one model: the models and their targets,
the configuration, the float model's outputs replayed to ``evaluate``, and the calibration stage
and its data pass timed against plain FP32 inference."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

import ptqkit
from ptqkit import PTQConfig
from ptqkit.analysis.metrics import size_bytes
from ptqkit.calibrate import session as calib_session
from ptqkit.zoo import train as zoo_train

FMNIST_MODELS = {"resnet_fmnist": 0.3, "mobilenetv2_fmnist": 0.5}  # name -> target drop (points)
CALIB_BATCH = 64


@dataclass
class Row:
    model: str
    calibrator: str
    fp32: float = float("nan")
    quantized: float = float("nan")
    drop: float = float("nan")
    agreement: float = float("nan")
    kl: float = float("nan")
    calib_s: float = float("nan")
    pass_s: float = float("nan")
    worst: str = ""  # the activation quantizer with the lowest own SQNR
    fp32_s: float = float("nan")
    error: str = ""
    qmodel: nn.Module | None = None


def load_model(name: str, quick: bool) -> tuple[nn.Module, str]:
    """The zoo model (trained and cached on first use); in quick mode an untrained one when the
    cache is cold, so that validating the script never trains."""
    if name in zoo_train.RECIPES and quick and zoo_train.cached_info(name) is None:
        torch.manual_seed(0)
        return zoo_train.MODELS[name]().eval(), "untrained (quick mode, zoo cache cold)"
    model = zoo_train.pretrained(name)
    info = zoo_train.cached_info(name) if name in zoo_train.RECIPES else None
    return model, f"cached zoo weights, test top-1 {info['test_top1']}%" if info else "pretrained"


class Replay:
    """The float model's outputs computed once, replayed batch by batch to :func:`evaluate`
    (so each calibrator's evaluation runs only the quantized model)."""

    def __init__(self, model: nn.Module, batches: Callable[[], Iterator]) -> None:
        with torch.no_grad():
            self.outputs = [model(b[0] if isinstance(b, tuple) else b) for b in batches()]
        self.size_bytes = size_bytes(model)
        self.i = 0

    def reset(self) -> Replay:
        self.i = 0
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.outputs[self.i]
        assert out.shape[0] == x.shape[0], "replayed batches out of order"
        self.i += 1
        return out


def fp32_seconds(model: nn.Module, batches: Callable[[], Iterator], repeats: int) -> float:
    """Best wall time of plain float inference over ``batches`` (after one warm-up batch)."""
    with torch.no_grad():
        model(next(iter(batches())))
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for b in batches():
                model(b)
            best = min(best, time.perf_counter() - t0)
    return best


# Instrumentation: the time of the data pass inside the calibration stage (the rest of the stage
# is the range solvers, a fixed cost per quantizer that does not grow with the data).
_PASS_SECONDS = [0.0]
_observe = calib_session.observe


def _timed_observe(*args, **kwargs):
    t0 = time.perf_counter()
    try:
        return _observe(*args, **kwargs)
    finally:
        _PASS_SECONDS[0] += time.perf_counter() - t0


calib_session.observe = _timed_observe


def quantize_timed(model, calib, cfg, repeats) -> tuple[nn.Module, float, float]:
    """Quantize ``repeats`` times on the list of batches ``calib``; the last model, and the best
    calibration-stage time and data-pass time."""
    best, best_pass, q = float("inf"), float("inf"), None
    for _ in range(repeats):
        _PASS_SECONDS[0] = 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = ptqkit.quantize(model, calib, cfg)
        best = min(best, q.ptq_info.stages.get("calibrate", float("nan")))
        best_pass = min(best_pass, _PASS_SECONDS[0])
    return q, best, best_pass


def cfg_for(name: str) -> PTQConfig:
    return PTQConfig(calibration=name, bias_correction=False, progress=False)  # W8 sym/ch, A8 asym
