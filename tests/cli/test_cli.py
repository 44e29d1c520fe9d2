"""The ``ptqkit`` command, run for real in a subprocess on a small real model (the digits CNN of
the conftest, handed to the CLI through a user module, a .pt2 file, .npz arrays and PNG files)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import ptqkit

ROOT = Path(__file__).resolve().parents[2]

USER_MODULE = """
import numpy as np, torch
from safetensors.torch import load_file
from ptqkit.zoo.models import DigitsCNN

def model():
    m = DigitsCNN()
    m.load_state_dict(load_file("digits.safetensors"))
    return m.eval()

def calib():
    x = torch.from_numpy(np.load("calib.npz")["x"])
    return [x[i : i + 64] for i in range(0, len(x), 64)]

def evaluation():
    d = np.load("eval.npz")
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    return [(x[i : i + 120], y[i : i + 120]) for i in range(0, len(x), 120)]

def not_a_module():
    return [1, 2, 3]

def broken():
    raise RuntimeError("weights missing")

def exported():
    return torch.export.load("digits.pt2").module()
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory, _digits_cnn_master, digits_data) -> Path:
    """A folder with the user's module, the model weights, arrays, images and a .pt2 file."""
    from PIL import Image
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("cli")
    model = _digits_cnn_master
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, d / "digits.safetensors")
    (d / "user_mod.py").write_text(USER_MODULE)
    x_train, _, x_test, y_test = digits_data
    np.savez(d / "calib.npz", x=x_train[:256].numpy())
    np.savez(d / "eval.npz", x=x_test.numpy(), y=y_test.numpy())
    np.save(d / "wrong_shape.npy", np.zeros((8, 3, 5, 5), np.float32))
    imgs = d / "images"
    imgs.mkdir()
    raw = ((x_train[:128, 0] - x_train.min()) / (x_train.max() - x_train.min()) * 255).byte()
    for i, a in enumerate(raw.numpy()):
        Image.fromarray(a, mode="L").save(imgs / f"d{i:03d}.png")
    (d / "empty").mkdir()
    (d / "empty" / "notes.txt").write_text("no images here")
    mixed = d / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(mixed / "b.png")
    batch = torch.export.Dim.DYNAMIC
    ep = torch.export.export(model, (x_train[:2],), dynamic_shapes={"x": {0: batch}})
    torch.export.save(ep, d / "digits.pt2")
    return d


def run(work: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``ptqkit ARGS`` in ``work`` (the console script when installed, else ``python -m``)."""
    exe = shutil.which("ptqkit")
    cmd = [exe] if exe else [sys.executable, "-m", "ptqkit.cli"]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    env["OMP_NUM_THREADS"] = "1"  # tiny model on a shared machine: threads only wait
    return subprocess.run(
        [*cmd, *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout
    )


def usage_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    err = p.stderr.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    for n in needles:
        assert n in last, last
    return last


@pytest.fixture
def cli(work, monkeypatch, capsys):
    """The same ``main`` in this process (no interpreter start-up, ~2 s of CPU each), for the
    bad-input cases: ``cli(*args)`` returns ``(exit code, last stderr line)``."""
    from ptqkit.cli import main

    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))

    def call(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main(list(args))
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err
        return code, err.splitlines()[-1] if err else ""

    return call


def check_usage(result: tuple[int, str], *needles: str) -> None:
    code, last = result
    assert code == 2, (code, last)
    for n in needles:
        assert n in last, last


MODEL, CALIB, EVAL = "user_mod:model", "calib.npz", "eval.npz"


def test_quantize_writes_everything(work):
    p = run(
        work,
        "quantize",
        "--model",
        MODEL,
        "--data",
        "user_mod:calib",
        "--eval-data",
        "user_mod:evaluation",
        "--out",
        "q1",
        "--max-plots",
        "4",
        "--no-pt2",
    )
    assert p.returncode == 0, p.stderr
    out = work / "q1"
    for name in ("model.ptq.safetensors", "model.int8.onnx", "report.html", "summary.json"):
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    assert s["command"] == "quantize" and s["evaluation"]["metric"] == "top1"
    assert s["evaluation"]["samples"] == 360 and s["evaluated_on_calibration_data"] is False
    assert s["quantization"]["layers"] == 4 and s["quantization"]["calibration_samples"] == 256
    assert s["onnx"]["int_kernels"] >= 4
    assert {"FP32 PyTorch", "INT8 ONNX Runtime"} <= set(s["latency_ms"])
    # --no-pt2: no PyTorch int8 (Inductor) row; ONNX Runtime is the runtime that ran int8
    assert s["pt2"] == {} and not (out / "model.int8.pt2").exists()
    runtimes = [r["runtime"] for r in s["int8_runtimes"]]
    assert runtimes == ["ONNX Runtime", "OpenVINO", "ExecuTorch (XNNPACK)"], s["int8_runtimes"]
    assert "int8 on ONNX Runtime:" in p.stdout and "Inductor" not in p.stdout
    assert "top1" in p.stdout and "degradation" in p.stdout and "report:" in p.stdout
    assert "ptqkit: quantizing" in p.stderr  # plain log lines: stderr is not a terminal
    # the saved model loads back onto the float architecture and computes the same outputs
    from ptqkit.zoo.models import DigitsCNN

    q = ptqkit.load(out / "model.ptq.safetensors", DigitsCNN())
    assert len(ptqkit.quant.modules.quant_layers(q)) == 4
    assert '<table id="summary">' in (out / "report.html").read_text()


def test_quantize_arrays_toml_config_quiet_and_force(work):
    (work / "cfg.toml").write_text(
        'calibration = "percentile"\nskip = ["fc"]\nbias_correction = false\n'
        "[calibrator_options]\npercentile = 99.9\n"
        "[weights]\nbits = 8\nper_channel = false\n"
        "[activations]\nbits = 8\nsymmetric = false\n"
    )
    (work / "q2").mkdir()
    (work / "q2" / "old.txt").write_text("x")
    p = run(
        work,
        "quantize",
        "--model",
        MODEL,
        "--data",
        CALIB,
        "--eval-data",
        EVAL,
        "--config",
        "cfg.toml",
        "--out",
        "q2",
        "--force",
        "--quiet",
        "--no-onnx",
        "--no-latency",
        "--max-plots",
        "2",
    )
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # --quiet: no logs, no warnings, no progress
    s = json.loads((work / "q2" / "summary.json").read_text())
    assert s["config"]["calibration"] == "percentile"
    assert s["config"]["calibrator_options"] == {"percentile": 99.9}
    assert s["config"]["weights"]["per_channel"] is False and s["config"]["skip"] == ["fc"]
    assert s["quantization"]["skipped"] == ["fc"] and s["onnx"] == {} and s["latency_ms"] == {}
    assert not (work / "q2" / "model.int8.onnx").exists()


def test_quantize_image_folder_and_a_pt2_file(work):
    p = run(
        work,
        "quantize",
        "--model",
        "digits.pt2",
        "--data",
        "images",
        "--grayscale",
        "--mean",
        "0.3",
        "--std",
        "0.35",
        "--out",
        "q3",
        "--no-latency",
        "--no-onnx",
        "--max-plots",
        "2",
    )
    assert p.returncode == 0, p.stderr
    s = json.loads((work / "q3" / "summary.json").read_text())
    assert "128 images" in s["calibration_data"] and "1x8x8" in s["calibration_data"]
    assert s["evaluation"]["metric"] == "agreement" and s["evaluated_on_calibration_data"]
    assert s["quantization"]["layers"] == 4  # the .pt2's aten convs became modules again
    assert s["quantization"]["traced"] is True
    assert any(a["rule"] == "validation_set" for a in s["advice"])


def test_model_callable_returning_an_exported_program(work, cli):
    args = ["quantize", "--model", "user_mod:exported", "--data", CALIB, "--out", "q4"]
    code, last = cli(*args, "--no-onnx", "--no-latency", "--max-plots", "1", "--quiet")
    assert code == 0, last
    s = json.loads((work / "q4" / "summary.json").read_text())
    assert s["quantization"]["layers"] == 4


def test_bad_toml_in_a_real_process(work):
    (work / "typo.toml").write_text('calibraton = "kl"\n')
    args = ["quantize", "--model", MODEL, "--data", CALIB, "--config", "typo.toml"]
    usage_error(
        run(work, *args, "--out", "x10"),
        "unknown key 'calibraton'",
        "did you mean 'calibration'",
    )
    assert not (work / "x10").exists()


def test_bad_toml(work, cli):
    q = ["quantize", "--model", MODEL, "--data", CALIB, "--out", "x11", "--config"]
    (work / "type.toml").write_text('[weights]\nbits = "8"\n')
    check_usage(cli(*q, "type.toml"), "[weights]", "bits must be an int, got '8'")
    (work / "nested.toml").write_text("[activations]\nper_chanel = true\n")
    check_usage(cli(*q, "nested.toml"), "unknown key activations.'per_chanel'", "'per_channel'")
    (work / "bool.toml").write_text("cle = 1\n")
    check_usage(cli(*q, "bool.toml"), "cle must be a bool, got 1")
    (work / "options.toml").write_text('[adaround_options]\nbeta = [20, "x"]\n')
    check_usage(cli(*q, "options.toml"), "[adaround_options]", "beta", "'x'")
    (work / "value.toml").write_text('calibration = "nope"\n')
    check_usage(cli(*q, "value.toml"), "unknown calibration 'nope'")
    (work / "syntax.toml").write_text("cle = \n")
    check_usage(cli(*q, "syntax.toml"), "invalid TOML")
    check_usage(cli(*q, "missing.toml"), "cannot read")
    assert not (work / "x11").exists()


def test_bad_models(cli):
    q = ["quantize", "--data", CALIB, "--out", "x1", "--model"]
    check_usage(cli(*q, "no_such_pkg.mod:model"), "cannot import 'no_such_pkg.mod'")
    check_usage(cli(*q, "user_mod:not_a_module"), "returned a list, not a torch.nn.Module")
    check_usage(cli(*q, "user_mod:nope"), "no attribute 'nope'")
    check_usage(cli(*q, "user_mod:broken"), "RuntimeError: weights missing")
    check_usage(cli(*q, "model.onnx"), "expected package.module:callable or a .pt2 file")


def test_pt2_with_pickled_objects_is_refused(work, cli):
    """A .pt2 whose weights are stored pickled is refused before anything is unpickled."""
    src, dst = work / "digits.pt2", work / "pickled.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("_weights_config.json"):
                cfg = json.loads(data)
                first = next(iter(cfg["config"]))
                cfg["config"][first]["use_pickle"] = True
                data = json.dumps(cfg).encode()
            zout.writestr(item, data)
    q = ["quantize", "--data", CALIB, "--out", "x5", "--model"]
    check_usage(cli(*q, "pickled.pt2"), "stored as a pickled object", "refused")
    (work / "garbage.pt2").write_bytes(b"not a zip")
    check_usage(cli(*q, "garbage.pt2"), "not a .pt2 archive")
    check_usage(cli(*q, "absent.pt2"), "no such file")


def test_bad_data(work, cli):
    q = ["quantize", "--model", MODEL, "--out", "x7", "--data"]
    check_usage(cli(*q, "empty"), "no images")
    check_usage(cli(*q, "mixed"), "different sizes", "a.png", "b.png", "--resize")
    check_usage(cli(*q, "nothing.npz"), "no such file")
    check_usage(cli(*q, "user_mod:model"), "not an iterable")
    check_usage(cli(*q, "images", "--mean", "0.5"), "--mean and --std go together")
    check_usage(cli(*q, "images", "--crop", "20"), "smaller than --crop 20")
    np.save(work / "objects.npy", np.array([{"a": 1}], dtype=object))
    check_usage(cli(*q, "objects.npy"), "pickled arrays are refused")
    assert not (work / "x7").exists()


def test_existing_out_needs_force(work, cli):
    (work / "full").mkdir()
    (work / "full" / "keep.txt").write_text("x")
    q = ["quantize", "--model", MODEL, "--data", CALIB, "--out"]
    check_usage(cli(*q, "full"), "exists and is not empty", "--force")
    check_usage(cli(*q, "full/keep.txt"), "is not a folder")
    check_usage(
        cli("report", "--model", MODEL, "--data", CALIB, "--out", "full/keep.txt"),
        "exists",
        "--force",
    )
    with pytest.raises(SystemExit) as e:  # argparse: a missing required flag
        cli("quantize", "--model", MODEL)
    assert e.value.code == 2


def test_failure_exit_code_and_debug_traceback(work):
    args = ["quantize", "--model", MODEL, "--data", "wrong_shape.npy", "--out", "x14"]
    p = run(work, *args)
    assert p.returncode == 1, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "Traceback" not in p.stderr and "rejected batch 0" in last and "--debug" in last
    p = run(work, *args, "--force", "--debug")
    assert p.returncode == 1 and "Traceback" in p.stderr


def test_compare_and_report(work, cli):
    p = run(
        work,
        "compare",
        "--model",
        MODEL,
        "--data",
        CALIB,
        "--eval-data",
        EVAL,
        "--calibrators",
        "minmax,mse",
        "--per-channel-only",
        "--no-recovery",
        "--out",
        "c1",
    )
    assert p.returncode == 0, p.stderr
    assert "minmax / per-channel" in p.stdout and "mse / per-channel" in p.stdout
    assert "best:" in p.stdout
    rows = json.loads((work / "c1" / "comparison.json").read_text())["rows"]
    assert len(rows) == 2 and rows[0]["quantized"] >= rows[1]["quantized"]
    assert all(r["quantize_s"] > 0 for r in rows)
    assert '<table id="comparison">' in (work / "c1" / "report.html").read_text()
    check_usage(
        cli("compare", "--model", MODEL, "--data", CALIB, "--calibrators", "mse,bogus"),
        "unknown calibrator(s) ['bogus']",
    )
    # a report from the model saved by `quantize` (test_quantize_writes_everything)
    saved = work / "q1" / "model.ptq.safetensors"
    if not saved.is_file():
        pytest.skip("needs the output of test_quantize_writes_everything")
    p = run(
        work,
        "report",
        "--model",
        MODEL,
        "--data",
        CALIB,
        "--eval-data",
        EVAL,
        "--quantized",
        str(saved),
        "--out",
        "r.html",
        "--no-latency",
        "--max-plots",
        "2",
    )
    assert p.returncode == 0, p.stderr
    html = (work / "r.html").read_text()
    assert '<table id="summary">' in html and "data:image/png;base64," in html


def test_demo_as_the_readme_says(tmp_path):
    """The README's quick check, exactly: ``ptqkit demo --model digits``."""
    p = run(tmp_path, "demo", "--model", "digits")
    assert p.returncode == 0, p.stderr
    out = tmp_path / "ptqkit-demo"
    for name in ("report.html", "summary.json", "model.int8.onnx", "model.ptq.safetensors"):
        assert (out / name).is_file(), name
    assert "top1" in p.stdout and "latency ONNX Runtime" in p.stdout
    # the demo runs the model on int8 kernels inside PyTorch too (Inductor), and says so
    assert "latency PyTorch int8 (Inductor)" in p.stdout
    if torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available():  # x86-64: on
        assert "int8 on PyTorch int8 (Inductor): 4/4 conv/linear on oneDNN int8 kernels" in p.stdout
    assert (out / "model.int8.pt2").is_file()
    s = json.loads((out / "summary.json").read_text())
    # every runtime that ran int8 (OpenVINO, ExecuTorch where installed), with its latency
    names = ["ONNX Runtime", "PyTorch int8 (Inductor)", "OpenVINO", "ExecuTorch (XNNPACK)"]
    assert [r["runtime"] for r in s["int8_runtimes"]] == names, s["int8_runtimes"]
    assert all("status" in r or r["latency_ms"]["1"] > 0 for r in s["int8_runtimes"])
    assert "int8 on OpenVINO: " in p.stdout and "int8 on ExecuTorch (XNNPACK): " in p.stdout
    # not a band on how the zoo's CNN trained on this machine (issue 27): a trained model, far
    # above chance (97-99% here, 10% untrained); 8-bit against its own FP32 outputs (~40 dB),
    # and a top-1 change no larger than the share of samples whose class changed
    ev = s["evaluation"]
    assert ev["fp32"] > 50 and s["pt2"]["agreement"]["sqnr_db_vs_fp32"] > 25, (ev, s["pt2"])
    assert abs(ev["degradation"]) <= 100 - ev["agreement"] + 1e-4, ev
    # no wall-clock bound here (a test must hold on a slow or loaded CPU): the demo's time is
    # measured in bench/, and tune's budget is checked from its own record
    assert s["recipe"]["budget_s"] > 0 and s["recipe"]["seconds"] > 0
    # the recipe was searched (--tune, default on): every trial recorded, in the report too
    assert s["recipe"]["summary"].startswith("chosen by ptqkit.tune") and s["recipe"]["chosen"]
    ran = [t for t in s["recipe"]["trials"] if t["status"] == "ran"]
    assert len(ran) >= 3 and all(0 <= t["agreement"] <= 100 for t in ran)
    html = (out / "report.html").read_text()
    assert '<table id="recipe">' in html and html.count("<tr>") > len(ran)


@pytest.mark.skipif(
    not os.environ.get("PTQKIT_SLOW_TESTS"),
    reason="about a minute of CPU (EfficientNet-Lite0); set PTQKIT_SLOW_TESTS=1 to run it",
)
def test_full_demo(tmp_path):
    """``ptqkit demo``: EfficientNet-Lite0 on photo crops (its time is measured in bench/, not
    bounded here)."""
    p = run(tmp_path, "demo", timeout=600)
    assert p.returncode == 0, p.stderr
    assert "agreement" in p.stdout and "no ImageNet labels" in p.stdout
    assert "expected top-1 cost" in p.stdout
    assert (tmp_path / "ptqkit-demo" / "report.html").is_file()
