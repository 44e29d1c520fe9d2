"""Small models whose quantization behaviour is certain by construction (weights set by hand),
for the tests of the recipe search and of the float fallback: unlike a model trained on the
machine, their errors do not depend on the CPU (AVX-512, VNNI) that runs the suite."""

from __future__ import annotations

import torch
from torch import nn


def _set(layers: list[tuple[nn.Linear, torch.Tensor]]) -> None:
    with torch.no_grad():
        for layer, w in layers:
            layer.weight.copy_(w)
            layer.bias.zero_()


def sensitive_mlp() -> nn.Module:
    """An MLP whose middle layer (``"2"``) is made sensitive to 3-bit weights on purpose, the
    others exact.

    ``fc1`` (8 -> 16) computes every hidden unit twice (rows ``r`` and ``r + 8`` equal); ``fc2``
    reads each pair as ``1.0·h_r - 0.95·h_r = 0.05·h_r``: the two weights nearly cancel, and no
    3-bit grid (at most 4 steps to ``|w| = 1``) holds both 1.0 and -0.95 closer than a step,
    so the quantized ``fc2`` is wrong by about its whole output (output SQNR ~0 dB) whatever the
    weight range. ``fc1`` and the head hold integers in ``[-3, 3]`` with a ±3 in every row:
    exact on the 3-bit per-channel grid. Kept in float, ``fc2`` leaves only the 8-bit
    activations' error (~40 dB)."""
    g = torch.Generator().manual_seed(0)
    m1 = torch.randint(-3, 4, (8, 8), generator=g).float()
    m3 = torch.randint(-3, 4, (10, 8), generator=g).float()
    m1[:, 0], m3[:, 0] = 3.0, -3.0
    fc1, fc2, fc3 = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 10)
    i = torch.arange(8)
    w2 = torch.zeros(8, 16)
    w2[i, i], w2[i, i + 8] = 1.0, -0.95
    _set([(fc1, torch.cat([m1, m1])), (fc2, w2), (fc3, m3)])
    return nn.Sequential(fc1, nn.ReLU(), fc2, nn.ReLU(), fc3).eval()


def clear_inputs(
    model: nn.Module, n: int, dim: int, seed: int, margin: float = 0.1
) -> torch.Tensor:
    """``n`` seeded N(0, 1) inputs on which the float model's decision is clear: its top two
    logits differ by more than ``margin`` times the RMS of the logits, far beyond the error
    8-bit activations cause (~1 % RMS at 40 dB), so that no class flips from rounding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, dim, generator=g)
    with torch.no_grad():
        out = model(x)
    top2 = out.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]) > margin * out.pow(2).mean().sqrt()
    assert int(keep.sum()) >= n, "too few clear inputs"
    return x[keep][:n]


def outlier_mlp() -> tuple[nn.Module, list[torch.Tensor], list]:
    """An MLP on which 3-bit min/max weights fail and MSE weights succeed, by construction.

    Every row of ``fc1`` holds 127 weights ±1 and a weight of 6 on input 0, which the data
    keeps at 0: the min/max grid (step 6/3 = 2) rounds every ±1 to 0 (half to even) and
    ``fc1`` outputs 0; the MSE range clips the 6 (``(6 - T)²`` against 127 rounding errors)
    to about 3.2, where ±1 is within 8 %, and the clipped weight reads a zero input. The
    head holds integers in ``[-3, 3]``, exact at 3 bits. Returns ``(model, calibration
    batches, held-out (input, FP32 class) batches)``."""
    g = torch.Generator().manual_seed(0)
    fc1, fc2 = nn.Linear(128, 32), nn.Linear(32, 10)
    w1 = torch.randint(0, 2, (32, 128), generator=g).float() * 2 - 1
    w2 = torch.randint(-3, 4, (10, 32), generator=g).float()
    w1[:, 0], w2[:, 0] = 6.0, 3.0
    _set([(fc1, w1), (fc2, w2)])
    model = nn.Sequential(fc1, nn.ReLU(), fc2).eval()
    x = torch.randn(616, 128, generator=g)
    x[:, 0] = 0.0
    test = [(t, model(t).argmax(1)) for t in x[256:].split(120)]
    return model, list(x[:256].split(64)), test
