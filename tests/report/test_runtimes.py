"""``ptqkit.report.runtimes``: the int8 runtimes a job runs (ONNX Runtime, OpenVINO, ExecuTorch
XNNPACK here; PyTorch Inductor in ``tests/test_job.py``) on the digits CNN: each one's outputs
against the simulation and FP32 (the numbers, from the files it wrote, not only its record),
its layer counts and latency in ``summary.json``, the report and the CLI's lines; a missing
package listed as not installed, the job going on; the registry and its selection."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _backends import needs, without
from _certain import certain_agreement

import ptqkit
from ptqkit.errors import ConfigError
from ptqkit.quant.primitives import sqnr_db
from ptqkit.report.runtimes import RUNTIMES, select
from ptqkit.report.table import runtime_lines

CFG = ptqkit.PTQConfig(progress=False)
OV_PIP, ET_PIP = RUNTIMES["openvino"].pip, RUNTIMES["executorch"].pip
BACKENDS = ("onnxruntime", "openvino", "executorch")


@pytest.fixture(scope="module")
def job(_digits_cnn_master, calib_batches, test_batches, tmp_path_factory):
    """One job on every runtime but Inductor (compiled in tests/test_job.py)."""
    out = tmp_path_factory.mktemp("job")
    model = copy.deepcopy(_digits_cnn_master)
    return model, ptqkit.run_job(
        model, calib_batches, test_batches, CFG, out_dir=out, pt2=False, runtimes=BACKENDS
    )


def _x(test_batches) -> torch.Tensor:
    return torch.cat([b[0] for b in test_batches])


@needs("openvino", OV_PIP)
@needs("executorch", ET_PIP)
def test_each_runtime_agrees_with_the_simulation(job, test_batches) -> None:
    model, job = job
    x = _x(test_batches)
    with torch.no_grad():
        f, q = model(x), job.qmodel(x)
    sure = certain_agreement(f, q)
    for key in BACKENDS:
        rec = job.runtimes[key]
        agree = rec["agreement"]
        # the integer kernels round where the simulation rounds, up to a near-tie: SQNR
        assert agree["samples"] == 360 and agree["sqnr_db_vs_simulation"] > 30, (key, agree)
        # flips vs FP32 <= flips of the simulation vs FP32 + flips of the runtime vs it
        assert agree["top1_vs_fp32"] >= sure - (100 - agree["top1_vs_simulation"]), (key, agree)
        assert rec["latency_ms"]["1"] == job.latency_ms[RUNTIMES[key].latency] > 0
    # the files the job wrote compute those outputs: OpenVINO (f32 pinned) on the ONNX file,
    # ExecuTorch's runtime on the .pte (planned for batch 1, the job's example)
    from ptqkit.export.executorch import load_pte
    from ptqkit.export.openvino import OvModule

    ov = OvModule(job.files.get("onnx_openvino", job.files["onnx_int8"]), threads=1)
    assert ov.inference_precision == "f32" and sqnr_db(q, ov(x)) > 30
    pte = load_pte(job.files["pte_int8"])
    got = torch.cat([pte(x[i : i + 1]) for i in range(0, 40)])
    assert sqnr_db(q[:40], got) > 30


@needs("openvino", OV_PIP)
@needs("executorch", ET_PIP)
def test_summary_lists_each_runtime_with_layers_and_latency(job) -> None:
    _, job = job
    with open(job.files["summary"]) as f:
        summary = json.load(f)
    rows = {r["runtime"]: r for r in summary["int8_runtimes"]}
    assert list(rows) == ["ONNX Runtime", "OpenVINO", "ExecuTorch (XNNPACK)"]
    for r in rows.values():  # the digits CNN: 3 convs and a linear
        assert r["layers"] == 4 and r["int_kernels"] + r["float_kernels"] == 4, r
        assert r["latency_ms"]["1"] > 0 and r["agreement"]["samples"] == 360, r
    ort = rows["ONNX Runtime"]  # and the residual add (QLinearAdd), the pool: integer_ops
    assert ort["int_kernels"] == 4 and ort["integer_ops"] > 4, ort
    ov = rows["OpenVINO"]  # from the execution graph: every conv/linear ran i8/u8, f32 pinned
    assert ov["int_kernels"] == 4 and ov["inference_precision"] == "f32"
    assert len(ov["layer_precisions"]) == 4
    assert all(p.split()[-1] in ("i8", "u8") for p in ov["layer_precisions"].values()), ov
    et = rows["ExecuTorch (XNNPACK)"]  # the logits' Linear keeps float weights (float output)
    assert (et["int_kernels"], et["float_kernels"], et["outside_delegate"]) == (3, 1, 0), et
    assert et["partitions"] >= 1 and et["delegated_nodes"] > 0
    lines = dict(runtime_lines(summary["int8_runtimes"]))
    assert lines["OpenVINO"].startswith("4/4 conv/linear on OpenVINO int8 kernels, 0 float")
    assert lines["ExecuTorch (XNNPACK)"].startswith("3/4 conv/linear on XNNPACK qs8 kernels")
    assert "latency OpenVINO" in job.table() and "latency ExecuTorch (XNNPACK)" in job.table()
    with open(job.files["report"]) as f:
        html = f.read()
    assert "int8 on OpenVINO" in html and "int8 on ExecuTorch (XNNPACK)" in html


def test_a_missing_package_is_listed_not_installed(
    digits_cnn, calib_batches, test_batches, tmp_path, monkeypatch
) -> None:
    without(monkeypatch, "openvino")
    without(monkeypatch, "executorch")
    job = ptqkit.run_job(digits_cnn, calib_batches, test_batches, CFG, out_dir=tmp_path,
                         runtimes=("openvino", "executorch"), layer_sqnr=False)  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["int8_runtimes"] == [
        {"runtime": "OpenVINO", "status": f"not installed ({OV_PIP})", "latency_ms": {}},
        {"runtime": "ExecuTorch (XNNPACK)", "status": f"not installed ({ET_PIP})",
         "latency_ms": {}},
    ]  # fmt: skip
    assert dict(runtime_lines(job.int8_runtimes()))["OpenVINO"] == (
        "not installed (pip install 'ptqkit[openvino]')"
    )
    assert "INT8 OpenVINO" not in job.latency_ms and "onnx_int8" in job.files
    f = job.qmodel(test_batches[0][0]).detach()
    assert sqnr_db(digits_cnn(test_batches[0][0]).detach(), f) > 25  # the job itself went on


def test_the_registry_and_its_selection(digits_cnn, calib_batches) -> None:
    assert list(RUNTIMES) == ["onnxruntime", "inductor", "openvino", "executorch"]
    assert [r.key for r in select(None, pt2=False)] == ["onnxruntime", "openvino", "executorch"]
    assert [r.key for r in select(("executorch", "onnxruntime", "executorch"))] == [
        "executorch", "onnxruntime"
    ]
    with pytest.raises(ConfigError, match=r"unknown runtime\(s\) \['tensorrt'\]; known: onnx"):
        ptqkit.run_job(digits_cnn, calib_batches, None, CFG, runtimes=("tensorrt",))
    with pytest.raises(ConfigError, match="tuple of names"):
        select("openvino")
    # --runtimes: not given (all), "" (none), names, an unknown one a usage error naming all
    from ptqkit.cli.commands import _runtimes
    from ptqkit.cli.usage import UsageError

    assert _runtimes(None) is None and _runtimes("") == ()
    assert _runtimes("openvino, executorch") == ("openvino", "executorch")
    with pytest.raises(UsageError, match="unknown trt; known: onnxruntime,inductor,openvino,exec"):
        _runtimes("onnxruntime,trt")


def test_no_onnx_export_skips_the_onnx_runtimes_without_a_warning(
    digits_cnn, calib_batches, recwarn
) -> None:
    job = ptqkit.run_job(digits_cnn, calib_batches, None, CFG, export=False, layer_sqnr=False,
                         runtimes=("onnxruntime", "openvino"))  # fmt: skip
    for key in ("onnxruntime", "openvino"):
        if "status" not in job.runtimes[key]:  # (openvino not installed: listed as such)
            assert job.runtimes[key]["skipped"].startswith("no int8 ONNX file"), job.runtimes
    assert not [w for w in recwarn if "failed" in str(w.message)]
    assert job.int8_runtimes() == [r for r in job.int8_runtimes() if "status" in r]
