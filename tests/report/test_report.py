"""The HTML report: what it measures, that it is self-contained, and that a real browser shows
it (headless Chromium, skipped with the reason when it is not installed)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import warnings

import numpy as np
import pytest

import ptqkit
from ptqkit.quant.modules import act_quants, quant_layers
from ptqkit.report import plots
from ptqkit.report.html import render, write_report
from ptqkit.report.measure import _clipped, collect

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits(_digits_cnn_master, calib_batches, test_batches):
    """The conftest's digits CNN (not modified here), its calibration and held-out batches."""
    return _digits_cnn_master, calib_batches, test_batches[:2]


@pytest.fixture(scope="module")
def quantized(digits):
    model, calib, evald = digits
    cfg = ptqkit.PTQConfig(calibration="mse", cle=True, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = ptqkit.quantize(model, calib, cfg)
        res = ptqkit.evaluate(model, q, evald, progress_bar=False)
    return q, res


@pytest.fixture(scope="module")
def report_file(tmp_path_factory, digits, quantized):
    model, calib, evald = digits
    q, res = quantized
    path = tmp_path_factory.mktemp("report") / "report.html"
    rep = write_report(
        q, path, model=model, data=calib, eval_data=evald, result=res, title="digits <test>"
    )
    return path, rep


def test_plots_are_png():
    counts = np.r_[np.zeros(10), np.arange(100.0), np.zeros(5)]
    edges = np.linspace(-1, 2, len(counts) + 1)
    for png in (
        plots.activation_histogram(counts, edges, {"minmax": (-1, 2), "kl": (0, 1)}, (0, 1), "t"),
        plots.weight_ranges((-np.ones(4), np.ones(4)), "w", before=(-np.ones(4) * 2, np.ones(4))),
        plots.sqnr_bars(["a", "b", "c"], [30.0, float("inf"), 10.0], "s"),
        plots.comparison_bars(["x", "y"], [90.0, 80.0], "top1"),
    ):
        assert png.startswith(PNG) and len(png) > 1000


def test_clipped_fraction_ignores_sub_step_clipping():
    counts = np.array([50.0, 0, 0, 0, 50])
    edges = np.arange(6.0)  # centers 0.5 .. 4.5
    assert _clipped(counts, edges, 0.0, 5.0, 255) == 0.0
    assert _clipped(counts, edges, 0.0, 3.0, 255) == pytest.approx(0.5)
    assert _clipped(counts, edges, 0.6, 5.0, 255) == 0.0  # within one bin: resolution


def test_histograms_hold_every_calibrator_range_and_the_used_one(digits, quantized):
    _, calib, evald = digits
    q, res = quantized
    rep = collect(q, data=calib, eval_data=evald, result=res, batches=len(calib))
    assert rep.histogram_samples == sum(len(x) for x in calib)
    quants = act_quants(q)
    assert rep.histograms_total == len(quants) == len(rep.histograms)
    for h in rep.histograms:
        assert {"minmax", "mse", "kl", "percentile"} <= set(h.ranges)
        assert h.counts.sum() > 0 and len(h.edges) == len(h.counts) + 1
        lo, hi = h.ranges["minmax"]
        assert h.edges[0] <= lo <= hi <= h.edges[-1]
        qt = quants[h.name]
        assert h.used == pytest.approx((float(qt.range[0]), float(qt.range[1])))
        # mse is the calibrator the model was quantized with, on the same data, same histogram
        assert h.used == pytest.approx(h.ranges["mse"], rel=1e-4, abs=1e-6)
    assert set(rep.sqnr) == set(quant_layers(q))
    assert all(np.isfinite(v) and v > 10 for v in rep.sqnr.values())
    assert set(rep.heldout_clipped) == {h.label for h in rep.histograms}
    assert rep.summary[0][0] == "FP32 top1"


def test_weight_ranges_before_and_after_cle(digits, quantized):
    model, _calib, _ = digits
    q, _ = quantized
    rep = collect(q, model=model)
    paired = {p["first"] for p in q.ptq_info.details["cle"]["pairs"]}
    assert paired
    for w in rep.weights:
        assert len(w.after[0]) == quant_layers(q)[w.name].weight_fp.shape[0]
        if w.name in paired:
            assert w.before is not None
            assert not np.allclose(w.before[1], w.after[1])
    assert collect(q).weights[0].before is None  # no float model: no "before"


def test_html_is_self_contained(report_file):
    path, rep = report_file
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert '<table id="summary">' in text
    assert "digits &lt;test&gt;" in text  # escaped
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    n_plots = 1 + len(rep.histograms) + len(rep.weights)  # SQNR bars + histograms + weights
    assert len(images) == n_plots
    assert all(base64.b64decode(b).startswith(PNG) for b in images)
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing fetched
    assert "<script" not in text
    for section in (
        "Advice",
        "Comparison of methods",
        "Per-layer sensitivity",
        "Weight ranges per channel",
    ):
        assert f"<h2>{section}</h2>" in text


def test_report_with_comparison_and_sensitivity(digits, quantized):
    model, calib, evald = digits
    q, res = quantized
    from ptqkit.compare import compare

    comp = compare(
        model,
        calib,
        evald,
        calibrators=["minmax", "mse"],
        granularity=False,
        recovery=False,
        progress_bar=False,
    )
    sens = ptqkit.sensitivity(q, evald[:1], q.ptq_config.replace(progress=False))
    rep = collect(q, result=res, comparison=comp, sensitivity=sens)
    html = render(rep)
    assert '<table id="comparison">' in html and '<table id="sensitivity">' in html
    assert "minmax / per-channel" in html and "mse / per-channel" in html
    assert rep.histograms == []  # no data given: nothing measured
    with pytest.raises(TypeError):
        write_report(None, "x.html")
    with pytest.raises(TypeError, match="the model comes first"):
        write_report("x.html", q)  # type: ignore[arg-type]


# -- a real browser -------------------------------------------------------------------------------
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None,
    reason="Chromium is not installed (Debian package `chromium`; .ci/run installs it)",
)
def test_report_in_headless_chromium(report_file, tmp_path):
    path, _rep = report_file
    base = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    url = path.resolve().as_uri()
    dom = subprocess.run(
        [*base, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    )
    assert '<table id="summary">' in dom.stdout
    assert "FP32 top1" in dom.stdout
    assert dom.stdout.count('src="data:image/png;base64,') >= 1
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [*base, "--window-size=1280,1600", f"--screenshot={shot}", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    for log in (dom.stderr, run.stderr):
        assert "Uncaught" not in log and "ERROR:CONSOLE" not in log, log[-2000:]
    assert shot.is_file() and shot.stat().st_size > 20_000
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"), dtype=float)
    assert img.shape[0] >= 1000 and img.std() > 10  # not blank: text, tables and plots
    top = img[: img.shape[0] // 3]
    assert (top < 128).mean() > 0.01  # dark pixels (text) where the summary table is
