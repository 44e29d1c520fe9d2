"""The technique registry: a technique is one registered object, and the pipeline, the shared
prefix's key, tune's candidates and cost model are read from it (a technique written here, in
a test, takes part in all of them without any other file being edited)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

import ptqkit
from ptqkit import ConfigError, PTQConfig
from ptqkit.quant import sqnr_db
from ptqkit.quant.modules import quant_layers
from ptqkit.recipe.candidates import measured_stages, stage_seconds, stages_of
from ptqkit.recipe.prefix import build_prefix, can_serve, prefix_key, quantize_from
from ptqkit.stage import Context
from ptqkit.technique import Candidate, Technique, register, registered, unregister
from ptqkit.techniques import candidates, in_phase, pipeline, prefix_fields, technique

CFG = PTQConfig(progress=False)


@dataclass
class _Seen:
    samples: int = 0
    batches: int = 0


@contextlib.contextmanager
def _count_inputs(ctx: Context) -> Iterator[_Seen]:
    """A tap: counts what reaches the copy's first layer during the calibration pass."""
    seen = _Seen()
    first = next(iter(quant_layers(ctx.qmodel).values()))

    def hook(module, args):
        seen.samples += args[0].shape[0]
        seen.batches += 1

    handle = first.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _record(ctx: Context) -> None:
    seen = ctx.taps["count_inputs"]
    ctx.info.details["count_inputs"] = {"samples": seen.samples, "batches": seen.batches}


COUNT = Technique(
    "count_inputs",
    750,
    _record,
    enabled=lambda c: c.seed == 7,
    tap=_count_inputs,
    share_tap=lambda c: c.replace(seed=7),  # a prefix opens it whatever recipe it was built for
    cost_key=lambda c: "count_inputs",
    prior_passes={"count_inputs": 0.25},
    candidates=(Candidate("count", {"seed": 7}, rank=15),),
)


@pytest.fixture
def counting():
    register(COUNT)
    try:
        yield COUNT
    finally:
        unregister(COUNT.name)


def test_builtin_pipeline_order_and_phases():
    names = [t.name for t in pipeline()]
    assert names[0] == "capture" and names[-1] == "fallback"
    assert names.index("calibrate") < names.index("weights") < names.index("bias_correction")
    assert [t.name for t in in_phase("calibrate")] == ["calibrate"]
    assert {t.name for t in in_phase("prefix")} == {"capture", "cle", "smoothquant", "awq"}
    # the prefix key is what the prefix techniques read, nothing a solve reads
    assert {"weights", "activations", "cle", "smoothquant", "num_batches"} <= set(prefix_fields())
    assert "bias_correction" not in prefix_fields() and "calibration" not in prefix_fields()


def test_registered_technique_runs_on_the_one_calibration_pass(counting, digits_cnn, calib_batches):
    cfg = CFG.replace(seed=7)
    q = ptqkit.quantize(digits_cnn, calib_batches, cfg)
    info = q.ptq_info
    # its tap saw the calibration pass, exactly once (no pass of its own)
    assert info.details["count_inputs"] == {
        "samples": sum(b.shape[0] for b in calib_batches),
        "batches": len(calib_batches),
    }
    assert "count_inputs" in info.stages  # timed by the pipeline like every technique
    # it changed nothing else: the same model as without it
    plain = ptqkit.quantize(digits_cnn, calib_batches, CFG)
    x = calib_batches[0]
    with torch.no_grad():
        assert torch.equal(q(x), plain(x))
        assert sqnr_db(digits_cnn(x), q(x)) > 20


def test_registered_technique_reaches_tune_and_the_cost_model(counting):
    names = [c.name for c in candidates()]
    assert names.index("mse") < names.index("count") < names.index("affine BC")  # by rank
    cfg = CFG.replace(seed=7)
    assert "count_inputs" in stages_of(cfg) and "count_inputs" not in stages_of(CFG)
    assert stage_seconds("count_inputs", cfg, 2.0, 10, {}) == pytest.approx(0.5)
    assert stage_seconds("count_inputs", cfg, 2.0, 10, {"count_inputs": 3.0}) == 3.0
    assert measured_stages({"count_inputs": 1.5, "calibrate": 2.0}, cfg)["count_inputs"] == 1.5


def test_shared_prefix_gives_a_registered_tap_its_data(counting, digits_cnn, calib_batches):
    """A recipe finished from a shared prefix gets the tap's data copied from the prefix's one
    calibration pass: the same model as its own quantize run."""
    prefix = build_prefix(digits_cnn, calib_batches, CFG)
    cfg = CFG.replace(seed=7)
    assert prefix_key(cfg) == prefix_key(CFG)
    q = quantize_from(prefix, cfg)
    assert q.ptq_info.details["count_inputs"]["batches"] == len(calib_batches)
    own = ptqkit.quantize(digits_cnn, calib_batches, cfg)
    with torch.no_grad():
        assert torch.equal(q(calib_batches[1]), own(calib_batches[1]))


def test_prefix_without_a_tap_does_not_serve_a_recipe_that_reads_it(digits_cnn, calib_batches):
    unshared = dataclasses.replace(COUNT, share_tap=None)
    register(unshared)
    try:
        prefix = build_prefix(digits_cnn, calib_batches, CFG)  # seed 0: its tap stays closed
        cfg = CFG.replace(seed=7)
        assert not can_serve(prefix, cfg) and can_serve(prefix, CFG)
        with pytest.raises(ConfigError, match="own calibration pass"):
            quantize_from(prefix, cfg)
    finally:
        unregister(unshared.name)


def test_registry_refuses_clashes():
    with pytest.raises(ConfigError, match="already registered"):
        register(Technique("capture", 1, lambda ctx: None))
    with pytest.raises(ConfigError, match="order 400 is taken"):
        register(Technique("another", 400, lambda ctx: None))
    with pytest.raises(ConfigError, match="phase"):
        Technique("x", 1, lambda ctx: None, phase="later")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no technique"):
        unregister("not_there")
    with pytest.raises(ConfigError, match="no technique named"):
        technique("not_there")
    assert "another" not in {t.name for t in registered()}


def test_auto_bias_correction_resolves_through_its_technique(digits_cnn, calib_batches):
    from ptqkit.techniques import resolve

    q = ptqkit.quantize(digits_cnn, calib_batches, CFG)  # bias_correction="auto"
    mode = q.ptq_info.details["bias_correction"]["mode"]
    got = resolve(CFG, q.ptq_info.details).bias_correction
    assert got == ("affine" if mode == "affine" else False)
