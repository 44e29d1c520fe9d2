"""``ptqkit.run_job``: the whole workflow as one library call, the same files and summary as the
CLI, nothing printed."""

from __future__ import annotations

import json

import pytest
import torch
from _certain import certain_agreement

import ptqkit
from ptqkit.errors import PTQWarning
from ptqkit.export import OrtModule, parity
from ptqkit.job import run_job
from ptqkit.quant.primitives import sqnr_db

CFG = ptqkit.PTQConfig(progress=False)


def onednn() -> bool:
    """Whether Inductor may lower the int8 program onto oneDNN kernels (x86-64 wheels: yes,
    unless a user turned ``torch.backends.mkldnn`` off)."""
    return bool(torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available())


def _outputs(model, qmodel, batches) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.cat([b[0] if isinstance(b, (tuple, list)) else b for b in batches])
    with torch.no_grad():
        return model(x), qmodel(x)


class _Recorder:
    def __init__(self) -> None:
        self.steps: list[str] = []

    def step(self, what: str):
        self.steps.append(what)
        from contextlib import nullcontext

        return nullcontext()

    def log(self, message: str) -> None:
        self.steps.append(message)


def test_run_job_writes_everything_and_prints_nothing(
    digits_cnn, calib_batches, test_batches, tmp_path, capsys
):
    rec = _Recorder()
    job = run_job(
        digits_cnn, calib_batches, test_batches, CFG, out_dir=tmp_path / "out", log=rec
    )
    assert capsys.readouterr().out == ""
    assert any(s.startswith("quantizing") for s in rec.steps)
    files = job.files
    for key in ("quantized_model", "onnx_int8", "onnx_fp32", "report", "summary"):
        assert key in files and (tmp_path / "out" / files[key].split("/")[-1]).exists(), key
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["evaluation"]["metric"] == "top1"
    assert summary["evaluation"]["agreement"] == pytest.approx(job.result.agreement)
    # against the same model's FP32 outputs, not a band on how it trained (issue 27): 8-bit is
    # > 25 dB (~40 here), and the agreement and the top-1 change within what that error allows
    f, q = _outputs(digits_cnn, job.qmodel, test_batches)
    sure = certain_agreement(f, q)
    assert sqnr_db(f, q) > 25 and job.result.agreement >= sure
    assert abs(job.result.degradation) <= 100 - job.result.agreement + 1e-4 <= 100 - sure + 2e-4
    assert "top-1 agreement" in job.table() and "latency ONNX Runtime" in job.table()
    # the saved model is the quantized model, and the int8 ONNX computes what it computes
    loaded = ptqkit.load(files["quantized_model"], digits_cnn)
    x = test_batches[0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), job.qmodel(x))
    res = parity(job.qmodel, OrtModule(files["onnx_int8"], threads=1), test_batches)
    assert res.max_steps <= 2.0, res  # rounding: ORT and the simulation differ by <= 2 steps
    assert res.top1_agreement >= certain_agreement(q, q + res.max_abs_diff), res
    # PyTorch int8 (Inductor): every conv/linear on a oneDNN int8 kernel, its outputs the
    # simulation's (a rounding near-tie may move one step: SQNR, not equality), timed
    pt2 = job.pt2
    want = (4, 4, 0) if onednn() else (4, 0, 4)  # torch.backends.mkldnn off: float kernels
    assert (pt2["layers"], pt2["int_kernels"], pt2["float_kernels"]) == want, pt2
    agree = pt2["agreement"]
    assert agree["samples"] == 360 and agree["sqnr_db_vs_simulation"] > 30, agree
    # flips vs FP32 <= flips of the simulation vs FP32 + flips of Inductor vs the simulation
    assert agree["top1_vs_fp32"] >= sure - (100 - agree["top1_vs_simulation"]), agree
    assert summary["pt2"]["latency_ms"]["1"] == job.latency_ms["INT8 PyTorch Inductor"] > 0
    # every runtime ran int8 and is listed with its layer counts and latency (OpenVINO and
    # ExecuTorch in detail: tests/report/test_runtimes.py)
    rows = summary["int8_runtimes"]
    assert [r["runtime"] for r in rows] == [
        "ONNX Runtime", "PyTorch int8 (Inductor)", "OpenVINO", "ExecuTorch (XNNPACK)"
    ]
    for r in rows:
        if "status" in r:  # a package not installed here: listed as such
            assert r["status"].startswith("not installed (pip install"), r
            continue
        assert r["layers"] == 4 and r["int_kernels"] + r["float_kernels"] == 4, r
        assert r["latency_ms"]["1"] > 0 and r["agreement"]["sqnr_db_vs_simulation"] > 30, r
    kernels = f"{want[1]}/4 conv/linear"
    assert "latency PyTorch int8 (Inductor)" in job.table() and kernels in job.table()
    html = (tmp_path / "out" / "report.html").read_text()
    assert "int8 on PyTorch int8 (Inductor)" in html and kernels in html
    # the saved program is the one that was checked: load it back, compare with the simulation
    program = ptqkit.export.load_pt2(files["pt2_int8"])
    with torch.no_grad():
        assert sqnr_db(job.qmodel(x), program.module()(x)) > 30


def test_run_job_without_a_folder_evaluates_on_calibration_data(digits_cnn, calib_batches):
    job = run_job(digits_cnn, calib_batches, None, CFG, export=False, latency=False)
    assert job.files == {} and job.summary["evaluated_on_calibration_data"] is True
    assert job.result.metric == "agreement" and job.result.samples == 256
    assert job.latency_ms == {} and job.onnx == {}


def test_run_job_times_the_example_it_is_given(digits_cnn, calib_batches):
    """A program exported with a static batch needs a whole batch as the example, and no
    sub-batch per-layer SQNR in the report."""
    from ptqkit.job import example_input

    example = example_input(calib_batches, 4)
    assert example is not None and example[0].shape[0] == 4
    job = run_job(digits_cnn, calib_batches, None, CFG, export=False, example=example,
                  layer_sqnr=False, runtimes=())
    assert job.latency_batch == 4 and "batch 4)" in job.table()
    assert set(job.latency_ms) == {"FP32 PyTorch", "INT8 simulated PyTorch"}
    f, q = _outputs(digits_cnn, job.qmodel, calib_batches)
    assert job.report.sqnr == {} and job.result.agreement >= certain_agreement(f, q)


def test_run_job_is_public():
    assert ptqkit.run_job is run_job
    assert ptqkit.JobResult.__name__ == "JobResult"


@pytest.mark.parametrize(
    "fp32,int8,text",
    [
        (12.69, 10.02, "int8 kernels, 1.27x faster"),
        (9.34, 12.68, "int8 kernels, 1.36x slower than FP32 on this machine"),
        (9.0, 0.0, ""),
    ],
)
def test_the_latency_line_says_slower_when_int8_is_slower(fp32, int8, text):
    from ptqkit.report.table import _speed

    assert _speed(fp32, int8) == text


def test_run_job_takes_an_options_object(digits_cnn, calib_batches):
    """A small options object (or its fields by name), at most 8 parameters, unknown field named."""
    import inspect

    from ptqkit.job import JobOptions

    assert len(inspect.signature(run_job).parameters) <= 8
    opts = ptqkit.JobOptions(export=False, latency=False, title="t")
    by_object = run_job(digits_cnn, calib_batches, None, CFG, opts)
    by_name = run_job(digits_cnn, calib_batches, None, CFG, opts, title="u")
    assert by_object.report.title == "t" and by_name.report.title == "u"
    assert by_object.result.agreement == by_name.result.agreement
    with pytest.raises(ptqkit.ConfigError, match=r"'out_dirr'.*out_dir"):
        run_job(digits_cnn, calib_batches, None, CFG, out_dirr="x")
    with pytest.raises(ptqkit.ConfigError, match="JobOptions"):
        run_job(digits_cnn, calib_batches, None, CFG, {"export": False})
    assert JobOptions(out_dir="o").report is not None and JobOptions().report is None


class DataDependent(torch.nn.Module):
    """A branch on a value (``if y.mean() > 0``): torch.export cannot follow it (ptqkit quantizes
    it with hooks), so the PyTorch int8 row cannot be built."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4 * 36, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x)).flatten(1)
        if y.mean() > 0:
            y = y * 2
        return self.fc(y)


def test_a_model_torch_export_cannot_follow_is_recorded_not_raised(calib_batches, tmp_path):
    torch.manual_seed(0)
    model = DataDependent().eval()
    with pytest.warns(PTQWarning, match=r"PyTorch int8 \(Inductor\) failed: torch.export failed"):
        job = run_job(model, calib_batches, None, CFG, out_dir=tmp_path / "o", export=False)
    assert job.pt2["error"].startswith("torch.export failed") and "\n" not in job.pt2["error"]
    f, q = _outputs(model, job.qmodel, calib_batches)
    assert job.result.agreement >= certain_agreement(f, q) and sqnr_db(f, q) > 25
    assert "INT8 PyTorch Inductor" not in job.latency_ms
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    # no runtime ran int8 (export=False: no ONNX; no program): at most 'not installed' entries
    assert summary["pt2"] == job.pt2
    assert [r for r in summary["int8_runtimes"] if "status" not in r] == [], summary
    assert all(r["status"].startswith("not installed") for r in summary["int8_runtimes"])
    et = job.runtimes["executorch"]  # ExecuTorch starts from the same program: recorded too
    assert "status" in et or et["error"].startswith("torch.export failed"), et
    assert "PyTorch int8 (Inductor) failed" in (tmp_path / "o" / "report.html").read_text()
    assert not (tmp_path / "o" / "model.int8.pt2").exists()


def test_pt2_off(digits_cnn, calib_batches):
    """``pt2=False`` leaves Inductor out even when ``runtimes`` names it."""
    job = run_job(digits_cnn, calib_batches, None, CFG, export=False, pt2=False, layer_sqnr=False,
                  runtimes=("inductor",))  # fmt: skip
    assert job.pt2 == {} and job.summary["pt2"] == {} and job.summary["int8_runtimes"] == []
    assert job.runtimes == {}
    assert set(job.latency_ms) == {"FP32 PyTorch", "INT8 simulated PyTorch"}
