"""What the CLI reads, the hard cases: user modules that must not shadow installed packages,
preprocessing flags that do not apply, labels that do not fit, every method failing, and a
``.pt2`` exported with a static batch size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]

USER_MODULE = """
import onnx  # must be the installed package, not the local onnx.py
import safetensors
import torch
from torch import nn

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()

def batches_of_3():
    return [torch.randn(3, 1, 8, 8) for _ in range(2)]
"""


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli_inputs")
    (d / "user_mod2.py").write_text(USER_MODULE)
    for shadow in ("onnx", "safetensors"):
        (d / f"{shadow}.py").write_text(f"raise RuntimeError('the local {shadow}.py was imported')")
    gen = np.random.default_rng(0)
    x = gen.standard_normal((66, 1, 8, 8)).astype(np.float32)
    np.savez(d / "d.npz", x=x, y=np.arange(66) % 10)
    np.savez(d / "short_labels.npz", x=x[:10], labels=np.zeros(9, np.int64))
    np.savez(d / "float_labels.npz", x=x[:10], y=np.full(10, 0.5))
    np.savez(d / "only_labels.npz", labels=np.zeros(10, np.int64))
    bad = x[:32].copy()
    bad[3, 0, 0, 0] = np.nan
    np.save(d / "nan.npy", bad)
    torch.manual_seed(0)
    ep = torch.export.export(Tiny().eval(), (torch.randn(4, 1, 8, 8),))  # static batch of 4
    torch.export.save(ep, d / "static.pt2")
    return d


@pytest.fixture
def cli(folder, monkeypatch, capsys):
    """``main`` in this process, in ``folder``, with ``sys.path`` restored afterwards."""
    from ptqkit.cli import main

    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(folder))])

    def call(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main(list(args))
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err
        return code, err

    return call


def test_local_files_do_not_shadow_installed_packages(folder):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run(  # `python -m` puts the current folder first on sys.path
        [sys.executable, "-m", "ptqkit.cli", "report", "--model", "user_mod2:model",
         "--data", "missing.npy", "--out", "r.html"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=120,
    )
    # the module was imported (with the real onnx and safetensors), then the data is missing
    assert p.returncode == 2, p.stderr
    assert "missing.npy: no such file" in p.stderr and "local" not in p.stderr


def test_help_says_that_model_runs_code(capsys):
    from ptqkit.cli import main

    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "IMPORTS that module and CALLS the callable, which runs its code" in out


@pytest.mark.parametrize(
    ("data", "flags", "kind"),
    [
        ("d.npz", ["--mean", "0.5", "--std", "0.2"], "an array file"),
        ("nan.npy", ["--scale", "2"], "an array file"),
        ("user_mod2:batches_of_3", ["--resize", "8"], "a loader of batches"),
    ],
)
def test_image_preprocessing_flags_are_refused_for_other_data(cli, data, flags, kind):
    code, err = cli("quantize", "--model", "user_mod2:model", "--data", data, *flags,
                    "--out", "o")
    assert code == 2
    assert f"only apply to image folders, but --data {data} is {kind}" in err.splitlines()[-1]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ("short_labels.npz", "labels 'labels': 9 labels for 10 inputs (key 'x')"),
        ("float_labels.npz", "labels 'y': holds non-integer values (float64)"),
        ("only_labels.npz", "the only array is the labels 'labels'"),
    ],
)
def test_labels_that_do_not_fit_name_the_key(cli, data, needle):
    code, err = cli("quantize", "--model", "user_mod2:model", "--data", data, "--out", "o")
    assert code == 2 and needle in err.splitlines()[-1]


def test_compare_exits_1_when_every_method_fails(cli):
    code, err = cli("compare", "--model", "user_mod2:model", "--data", "nan.npy",
                    "--eval-data", "d.npz", "--calibrators", "minmax,mse", "--no-recovery",
                    "--per-channel-only", "-q")
    assert code == 1 and "all 2 methods failed" in err.splitlines()[-1]


def test_static_batch_pt2_is_detected_and_used_everywhere(cli, folder):
    code, err = cli("quantize", "--model", "static.pt2", "--data", "d.npz", "--out", "q",
                    "--no-latency", "--force")
    assert code == 0, err
    assert "exported with a static batch of 4" in err
    assert "2 of 66 samples dropped" in err
    summary = json.loads((folder / "q" / "summary.json").read_text())
    assert summary["evaluation"]["samples"] == 64
    assert (folder / "q" / "model.int8.onnx").is_file() and (folder / "q" / "report.html").is_file()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / "q" / "model.int8.onnx"))
    (out,) = sess.run(None, {sess.get_inputs()[0].name: np.zeros((4, 1, 8, 8), np.float32)})
    assert out.shape == (4, 10)

    code, err = cli("compare", "--model", "static.pt2", "--data", "d.npz", "--calibrators",
                    "minmax", "--no-recovery", "--per-channel-only", "--out", "c", "--force")
    assert code == 0, err
    rows = json.loads((folder / "c" / "comparison.json").read_text())["rows"]
    assert rows and not any(r["error"] for r in rows)
    assert (folder / "c" / "report.html").is_file()

    code, err = cli("quantize", "--model", "static.pt2", "--data", "user_mod2:batches_of_3",
                    "--out", "q3", "--force")
    last = err.splitlines()[-1]
    assert code == 2 and "batch 0 has 3 samples" in last and "Dim.DYNAMIC" in last
    code, err = cli("quantize", "--model", "static.pt2", "--data", "d.npz", "--sensitivity",
                    "--out", "q4", "--force")
    assert code == 2 and "--sensitivity runs sub-batches" in err.splitlines()[-1]
