"""Shared fixtures: a small real model (a CNN trained for a couple of seconds on scikit-learn's
8×8 digits) and its data, built once per test session.

The model is the zoo's :class:`~ptqkit.zoo.DigitsCNN` architecture (conv-BN-ReLU, a residual add,
a strided conv, global pooling, a linear head), but trained here with a short fixed recipe so that
the suite never depends on a warm cache: ``ptqkit.zoo.pretrained("digits_cnn")`` trains the full
recipe (longer) when its cache is cold.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# Tiny models gain nothing from intra-op threads, and on a busy machine with few cores extra
# threads make every op wait for the others (measured: 12× slower training of the digits CNN
# with 2 threads on a loaded 2-core box). Tests are single-threaded.
torch.set_num_threads(1)

DIGITS_N_TEST = 360


@pytest.fixture(scope="session")
def digits_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: 1,437 / 360 standardized 1×8×8 digits."""
    from ptqkit.zoo.data import digits, split

    return split(*digits(), n_test=DIGITS_N_TEST, seed=0)


def train_digits_cnn(x: torch.Tensor, y: torch.Tensor, epochs: int = 8) -> nn.Module:
    """A :class:`DigitsCNN` trained with AdamW + one-cycle from seed 0 (about 2 s on one core);
    returned in eval mode, about 97% top-1 on the held-out digits."""
    from ptqkit.zoo.models import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN()
    bs = 64
    steps = (len(x) + bs - 1) // bs
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=epochs * steps)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(steps):
            idx = perm[i * bs : (i + 1) * bs]
            if len(idx) < 2:
                sched.step()
                continue
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@pytest.fixture(scope="session")
def _digits_cnn_master(digits_data) -> nn.Module:
    x_train, y_train, _, _ = digits_data
    return train_digits_cnn(x_train, y_train)


@pytest.fixture
def digits_cnn(_digits_cnn_master) -> nn.Module:
    """A fresh copy of the trained digits CNN (eval mode): tests may modify it freely."""
    return copy.deepcopy(_digits_cnn_master)


@pytest.fixture(scope="session")
def calib_batches(digits_data) -> list[torch.Tensor]:
    """256 training digits in 4 batches of 64 (input tensors only)."""
    x_train = digits_data[0]
    return [x_train[i : i + 64] for i in range(0, 256, 64)]


@pytest.fixture(scope="session")
def test_batches(digits_data) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 360 held-out digits as ``(input, label)`` batches of 120."""
    _, _, x_test, y_test = digits_data
    return [(x_test[i : i + 120], y_test[i : i + 120]) for i in range(0, len(x_test), 120)]


@pytest.fixture(scope="session")
def quantized_digits(_digits_cnn_master, calib_batches) -> nn.Module:
    """The digits CNN quantized with the default config (W8 per-channel, A8 mse, auto bias corr.).

    Shared by the tests: do not modify it (quantize again, or deepcopy it)."""
    import ptqkit

    return ptqkit.quantize(_digits_cnn_master, calib_batches, ptqkit.PTQConfig(progress=False))
