"""How ``tune`` compares two recipes on the held-out samples: a lead in agreement counts only
when a paired sign test finds it significant; otherwise the lower KL wins."""

from __future__ import annotations

import torch

from ptqkit.recipe.holdout import Score, decisive


def _score(hits: list[bool], kl: float) -> Score:
    h = torch.tensor(hits)
    return Score(100.0 * float(h.float().mean()), kl, None, h)


def test_two_samples_ahead_of_32_is_a_tie_decided_by_kl():
    a = _score([True] * 32, kl=0.010)  # 100 %
    b = _score([True] * 30 + [False] * 2, kl=0.004)  # 93.75 %, lower KL
    assert decisive(a, b, 32) is None and decisive(b, a, 32) is None


def test_a_large_one_sided_lead_is_significant():
    a = _score([True] * 64, kl=0.010)
    b = _score([True] * 56 + [False] * 8, kl=0.004)  # 8 samples, all favouring a
    assert decisive(a, b, 64) is True and decisive(b, a, 64) is False


def test_swaps_cancel_out():
    # 6 predictions favour a, 5 favour b: a lead of one sample among 11 that differ
    a = _score([True] * 6 + [False] * 5 + [True] * 21, kl=0.02)
    b = _score([False] * 6 + [True] * 5 + [True] * 21, kl=0.01)
    assert decisive(a, b, 32) is None


def test_without_hits_more_than_one_sample_counts():
    a, b = Score(100.0, 0.02, None), Score(93.75, 0.01, None)
    assert decisive(a, b, 32) is True  # 2 samples of 32
    assert decisive(a, Score(96.875, 0.01, None), 32) is None  # 1 sample


def test_split_by_samples_keeps_the_chapter_minimum():
    """128 samples in 8 batches of 16: whole batches would calibrate on 96 (< 100); the split
    cuts the 7th batch so that 100 calibrate and 28 are held out, labels cut alike."""
    import torch

    from ptqkit.recipe.holdout import split

    batches = [(torch.arange(16.0) + 16 * i, torch.arange(16) + 16 * i) for i in range(8)]
    cal, held = split(batches, 0.25, 100)
    assert sum(len(x) for x, _ in cal) == 100 and sum(len(x) for x, _ in held) == 28
    joined = torch.cat([x for x, _ in cal] + [x for x, _ in held])
    assert torch.equal(joined, torch.arange(128.0))  # every sample once, in order
    assert all(torch.equal(x, y.double().float()) for x, y in cal + held)
    # too few to spare 10 held-out samples beyond the minimum: whole batches as before
    cal, held = split(batches[:6], 0.25, 100)
    assert [len(x) for x, _ in cal] == [16] * 4 and len(held) == 2
    # enough already: unchanged
    cal, held = split(batches, 0.25, 96)
    assert len(cal) == 6 and len(held) == 2
