"""The public API: every name in ``ptqkit.__all__`` resolves, and ``ptqkit.evaluate`` is the
function (with its real signature) whatever submodules were imported before."""

from __future__ import annotations

import inspect
import subprocess
import sys

import ptqkit


def test_every_public_name_resolves():
    for name in ptqkit.__all__:
        assert getattr(ptqkit, name) is not None, name


def test_evaluate_is_a_function_before_and_after_importing_every_submodule():
    code = (
        "import importlib, inspect, pkgutil, ptqkit\n"
        "before = str(inspect.signature(ptqkit.evaluate))\n"
        "for m in pkgutil.walk_packages(ptqkit.__path__, 'ptqkit.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "after = str(inspect.signature(ptqkit.evaluate))\n"
        "print(inspect.isfunction(ptqkit.evaluate), before == after, after)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    ).stdout.split(maxsplit=2)
    assert out[0] == "True" and out[1] == "True", out
    assert out[2].startswith("(fp32_model") or "qmodel" in out[2], out
    assert "*args" not in out[2]


def test_evaluate_signature_in_process():
    sig = inspect.signature(ptqkit.evaluate)
    assert "data" in sig.parameters and "metric" in sig.parameters


def test_stage_options_are_public_and_accepted_by_the_config():
    opts = ptqkit.AdaRoundOptions(granularity="block", block_layers=2)
    cfg = ptqkit.PTQConfig(adaround=True, adaround_options=opts)
    assert cfg.adaround_options is opts
    assert ptqkit.PTQConfig.from_dict(cfg.to_dict()) == cfg
    bc = ptqkit.BiasCorrectionOptions()
    assert ptqkit.PTQConfig(bias_correction_options=bc).bias_correction_options == bc
