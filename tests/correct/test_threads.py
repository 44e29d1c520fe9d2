"""ptqkit.correct.threads: torch's intra-op thread count inside a block, restored after."""

from __future__ import annotations

import pytest
import torch

from ptqkit.correct.threads import threads


def test_threads_inside_and_restored() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with threads(None):
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"), threads(1):
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2  # restored after an error too
    finally:
        torch.set_num_threads(before)
