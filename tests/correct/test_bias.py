"""Bias correction: the empirical variant makes every quantized layer's mean output equal the
float network's on the calibration data, streaming; the analytic variant follows the clipped-
normal formula from BatchNorm statistics and reduces the mean error; bad inputs fail clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.config import BiasCorrectionOptions
from ptqkit.correct.bias import clipped_normal_mean, correct_bias
from ptqkit.correct.means import channel_sum
from ptqkit.info import PTQInfo
from ptqkit.quant.modules import float_mode, quant_layers

W4_TENSOR = ptqkit.QuantSpec(bits=4, per_channel=False)


def _layer_means(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    layers = quant_layers(model)
    sums: dict[str, list] = {n: [0, 0] for n in layers}

    def hook(n: str):
        def fn(m, a, y):
            s, c = channel_sum(y, m.layer)
            sums[n][0] = sums[n][0] + s
            sums[n][1] += c

        return fn

    hs = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hs:
        h.remove()
    return {n: s / c for n, (s, c) in sums.items()}


def _mean_errors(q: nn.Module, batches: list[torch.Tensor]) -> dict[str, float]:
    got = _layer_means(q, batches)
    with float_mode(q):  # float weights *and* float biases: the uncorrected network
        ref = _layer_means(q, batches)
    return {n: float((got[n] - ref[n]).abs().mean()) for n in got}


def _first(batches: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The first ``n`` samples of ``batches`` (the ones bias correction reads)."""
    return list(torch.cat(batches)[:n].split(batches[0].shape[0]))


def test_empirical_matches_float_means(digits_cnn, calib_batches):
    cfg = ptqkit.PTQConfig(weights=W4_TENSOR, bias_correction=False, progress=False)
    plain = ptqkit.quantize(digits_cnn, calib_batches, cfg)
    fixed = ptqkit.quantize(digits_cnn, calib_batches, cfg.replace(bias_correction="empirical"))
    used = _first(calib_batches, BiasCorrectionOptions().samples)  # exact on the samples it read
    assert sum(len(b) for b in used) < sum(len(b) for b in calib_batches)
    before, after = _mean_errors(plain, used), _mean_errors(fixed, used)
    for n in after:
        assert after[n] < 1e-4, (n, after[n])
        assert after[n] < before[n]
    d = fixed.ptq_info.details["bias_correction"]
    assert d["mode"] == "empirical" and set(d["corrected"]) == set(after)
    # the float reference is still the float network: corrected biases are only used quantized
    x = calib_batches[0]
    with torch.no_grad(), float_mode(fixed):
        assert torch.allclose(fixed(x), digits_cnn(x), atol=1e-4)


def test_clipped_normal_mean_matches_sampling():
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([-1.0, 0.5, 2.0, 7.0, 3.0])
    sigma = torch.tensor([1.0, 2.0, 0.5, 1.0, 0.0])
    lo = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0])
    hi = torch.tensor([float("inf"), 6.0, 6.0, 6.0, 6.0])
    x = mu + sigma * torch.randn(400_000, 5, generator=g)
    mc = torch.minimum(torch.maximum(x, lo), hi).mean(0)
    assert torch.allclose(clipped_normal_mean(mu, sigma, lo, hi).float(), mc, atol=1e-2)
    # no clipping: the mean itself
    ident = clipped_normal_mean(mu, sigma, torch.tensor(-float("inf")), torch.tensor(float("inf")))
    assert torch.allclose(ident.float(), mu)


def _own_mean_error(q: nn.Module, name: str, batches: list[torch.Tensor]) -> float:
    """Mean over channels of ``|E[ỹ - y]|`` for layer ``name`` alone, on its float input: the
    error its own weight quantization adds (what the analytic correction targets)."""
    layer = quant_layers(q)[name]
    seen = []
    h = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad(), float_mode(q):
        for x in batches:
            q(x)
    h.remove()
    x = torch.cat(seen)
    with torch.no_grad():
        y_q = layer.layer(x)
        layer.use_float()
        y_f = layer.layer(x)
        layer.refresh()
    d, n = channel_sum(y_q - y_f, layer.layer)
    return float((d / n).abs().mean())


def test_analytic_reduces_mean_error_data_free(digits_cnn, calib_batches):
    cfg = ptqkit.PTQConfig(weights=W4_TENSOR, bias_correction=False, progress=False)
    plain = ptqkit.quantize(digits_cnn, calib_batches, cfg)
    fixed = ptqkit.quantize(digits_cnn, calib_batches, cfg.replace(bias_correction="analytic"))
    d = fixed.ptq_info.details["bias_correction"]
    # conv2 reads relu(conv1) and fc reads pool(relu(conv3)): statistics known; conv1 reads the
    # model input and conv3 reads relu(add), whose distribution the BatchNorms do not give
    assert set(d["corrected"]) == {"conv2", "fc"}
    assert {"conv1", "conv3"} <= set(d["not_corrected"])
    for name in ("conv2", "fc"):
        before = _own_mean_error(plain, name, calib_batches)
        after = _own_mean_error(fixed, name, calib_batches)
        assert after < 0.5 * before, (name, before, after)


def test_analytic_after_cle_uses_rescaled_statistics(digits_cnn, calib_batches, test_batches):
    cfg = ptqkit.PTQConfig(weights=W4_TENSOR, cle=True, bias_correction="analytic", progress=False)
    q = ptqkit.quantize(digits_cnn, calib_batches, cfg)
    assert "fc" in q.ptq_info.details["bias_correction"]["corrected"]
    x, y = test_batches[0]
    with torch.no_grad():
        assert (q(x).argmax(1) == y).float().mean() > 0.85


def test_empirical_without_data_is_a_clear_error(quantized_digits):
    import copy

    q = copy.deepcopy(quantized_digits)
    cfg = ptqkit.PTQConfig(bias_correction="empirical", progress=False)
    with pytest.raises(ptqkit.DataError, match="analytic"):
        correct_bias(q, None, cfg, PTQInfo())


def test_analytic_without_batchnorm_is_a_clear_error(digits_cnn, calib_batches):
    cfg = ptqkit.PTQConfig(fold_bn=False, bias_correction="analytic", progress=False)
    with pytest.raises(ptqkit.ModelError, match="BatchNorm"):
        ptqkit.quantize(digits_cnn, calib_batches, cfg)


def test_nothing_quantized_warns(digits_cnn, calib_batches):
    from ptqkit.capture import prepare

    info = PTQInfo()
    qm = prepare(digits_cnn, ptqkit.PTQConfig(progress=False), info)
    with pytest.warns(ptqkit.PTQWarning, match="no layer has quantized weights"):
        correct_bias(qm, calib_batches, ptqkit.PTQConfig(progress=False), info)


def test_float_means_tapped_from_calibration_equal_a_float_pass(digits_cnn, calib_batches):
    """The pipeline takes the float means during calibration (one pass fewer); the biases are
    the ones a separate float pass over the same first ``samples`` samples gives."""
    opts = BiasCorrectionOptions(samples=40)  # not a multiple of the batch size
    cfg = ptqkit.PTQConfig(
        weights=W4_TENSOR, bias_correction="empirical", bias_correction_options=opts,
        progress=False,
    )
    tapped = ptqkit.quantize(digits_cnn, calib_batches, cfg)
    assert tapped.ptq_info.details["bias_correction"]["passes"] == 1
    alone = ptqkit.quantize(digits_cnn, calib_batches, cfg.replace(bias_correction=False))
    correct_bias(alone, calib_batches, cfg, PTQInfo())
    a, b = quant_layers(tapped), quant_layers(alone)
    for n in a:
        assert torch.equal(a[n].bias_q, b[n].bias_q), n
    assert any(not torch.equal(a[n].bias_q, a[n].bias_fp) for n in a)


def test_auto_is_empirical_on_a_traced_model(digits_cnn, calib_batches):
    cfg = ptqkit.PTQConfig(weights=W4_TENSOR, progress=False)
    auto = ptqkit.quantize(digits_cnn, calib_batches, cfg.replace(bias_correction="auto"))
    emp = ptqkit.quantize(digits_cnn, calib_batches, cfg.replace(bias_correction="empirical"))
    x = calib_batches[0]
    with torch.no_grad():
        assert torch.equal(auto(x), emp(x))
    assert auto.ptq_info.details["bias_correction"]["corrected"]


class _CountsCalls(nn.Module):
    """Changes its state in forward: captured with hooks, not a graph the engine can walk."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_auto_skips_an_untraced_model_and_says_why():
    torch.manual_seed(0)
    m = _CountsCalls().eval()
    data = [torch.randn(16, 3, 6, 6) for _ in range(4)]
    cfg = ptqkit.PTQConfig(weights=W4_TENSOR, progress=False)
    with pytest.warns(ptqkit.PTQWarning):  # the hooks capture says why
        q = ptqkit.quantize(m, data, cfg.replace(bias_correction="auto"))
    assert q.ptq_info.capture == "hooks"
    d = q.ptq_info.details["bias_correction"]
    assert d["mode"] == "auto" and not d["corrected"] and "one pass per layer" in d["skipped"]
    plain = ptqkit.quantize(m, data, cfg)
    with torch.no_grad():  # nothing was changed
        assert torch.equal(q(data[0]), plain(data[0]))
