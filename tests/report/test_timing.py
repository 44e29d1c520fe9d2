"""``ptqkit.report.timing``: the pieces of the PyTorch int8 row that need no compilation (the
program for a model whose batch is fixed, the fixed-size chunks a compiled function is fed, the
record-and-warn of a failing runtime). The compiled row itself: ``tests/test_job.py``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.errors import PTQWarning
from ptqkit.report.timing import _chunked, _program, pt2_agreement, recorded


class FixedBatch(nn.Module):
    """``reshape(4, -1)``: only a batch of 4 runs, so torch.export cannot free the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).reshape(4, -1))


def test_a_fixed_batch_gets_a_static_program(digits_data):
    x_train, x_test = digits_data[0], digits_data[2]
    torch.manual_seed(0)
    q = ptqkit.quantize(
        FixedBatch().eval(),
        [x_train[i : i + 4] for i in range(0, 128, 4)],
        ptqkit.PTQConfig(progress=False),
    )
    program, dynamic = _program(q, (x_test[:4],), None)
    assert dynamic is False
    with torch.no_grad():
        assert ptqkit.quant.primitives.sqnr_db(q(x_test[:4]), program.module()(x_test[:4])) > 30


class Exactly(nn.Module):
    """Refuses any batch but ``n`` (as a function compiled for one batch size should be fed)."""

    def __init__(self, inner: nn.Module, n: int) -> None:
        super().__init__()
        self.inner, self.n, self.seen = inner, n, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert len(x) == self.n, len(x)
        self.seen += 1
        return self.inner(x)


def test_chunks_of_the_compiled_batch_padded_and_dropped(digits_cnn, quantized_digits, digits_data):
    """10 samples through a batch-4 function: 3 calls, the last padded by 2 copies whose outputs
    are dropped; the same as the whole batch at once. Scored against itself: 100 %, SQNR inf."""
    x = digits_data[2][:10]
    fn = Exactly(quantized_digits, 4)
    with torch.no_grad():
        assert torch.equal(_chunked(fn, (x,), 4), quantized_digits(x))
    assert fn.seen == 3
    res = pt2_agreement(Exactly(quantized_digits, 4), digits_cnn, quantized_digits, [x, x[:3]], 4)
    assert res["samples"] == 13 and res["top1_vs_simulation"] == 100.0
    assert res["sqnr_db_vs_simulation"] == float("inf") and res["sqnr_db_vs_fp32"] > 20
    assert pt2_agreement(fn, digits_cnn, quantized_digits, [{"x": x}], 4) == {
        "skipped": "keyword or non-tensor inputs"
    }


def test_recorded_keeps_the_error_and_warns():
    rec: dict = {}
    warned = pytest.warns(PTQWarning, match=r"^PyTorch int8 failed: no luck$")
    with warned, recorded(rec, "PyTorch int8"):
        raise RuntimeError("no\n luck")
    assert rec == {"error": "no luck"}
    with recorded(rec := {}, "x"):
        pass
    assert rec == {}
