"""bench/lm.py: the decoder builds, trains a step, and ptqkit's weight-only quantization of it
stays close to FP32 (logits compared), so the LM benchmark's code cannot rot."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import lm

import ptqkit
from ptqkit import PTQConfig, QuantSpec

TINY = lm.LMConfig(d_model=32, n_layers=2, n_heads=2, ctx=16, steps=3, batch=4, warmup=1)


def _data() -> torch.Tensor:
    text = Path(lm.__file__).read_bytes()
    return lm.as_tensor(text)


def test_trains_and_ties() -> None:
    torch.manual_seed(0)
    model = lm.train(TINY, _data())
    assert model.lm_head.weight is model.tok.weight
    w = lm.eval_windows(_data(), TINY.ctx, 8)
    r = lm.perplexity(model, w)
    assert torch.isfinite(torch.tensor(r["loss"]))
    assert abs(r["bpb"] - r["loss"] / 0.6931471805599453) < 1e-9


def test_weight_only_close_to_fp32() -> None:
    model = lm.train(TINY, _data())
    w = lm.eval_windows(_data(), TINY.ctx, 8)
    calib = list(w[:, :-1].split(4))
    cfg = PTQConfig(activations=None, weights=QuantSpec(bits=8, per_channel=True), progress=False)
    q = ptqkit.quantize(model, calib, cfg)
    with torch.no_grad():
        ref, out = model(w[:, :-1]), q(w[:, :-1])
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum())
    assert sqnr > 25, float(sqnr)
    assert model.tok.weight is model.lm_head.weight  # the FP32 model is left untouched
