"""ptqkit.data helpers."""

from __future__ import annotations

import torch

from ptqkit.data import channels_last


def test_channels_last_moves_only_4d_float_tensors_and_keeps_values():
    img = torch.randn(2, 3, 5, 7)
    ids = torch.arange(2 * 3 * 5 * 7).reshape(2, 3, 5, 7)  # integer: left alone
    seq = torch.randn(2, 3, 5)
    (a, b, c), kw = channels_last((img, ids, seq), {"mask": img, "n": 3})
    assert a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous()
    assert torch.equal(a, img) and torch.equal(kw["mask"], img) and kw["n"] == 3
    assert b is ids and c is seq
    conv = torch.nn.Conv2d(3, 4, 3)
    with torch.no_grad():  # the conv keeps the layout and computes the same thing
        y = conv(a)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(y, conv(img), atol=1e-5)
