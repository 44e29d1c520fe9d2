"""A forward that changes the model's state: the quantized copy starts from the user's state,
whatever the stages ran (capture check, calibration, auto ranges, bias correction, fallback,
tune's trials), and the user's model is not touched."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit import PTQConfig
from ptqkit.capture.state import StateRestore, hold, release
from ptqkit.quant.modules import float_mode


class Stateful(nn.Module):
    """Counts its calls (a buffer and a Python int), keeps a running mean written in place and a
    cache reassigned in ``forward``; the output depends on all of them, heavily on the count."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("running", torch.zeros(32))
        self.n = 0
        self.history: list[int] = []
        self.cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.n += 1
        self.history.append(self.n)
        h = torch.relu(self.fc1(x))
        self.running.mul_(0.9).add_(0.1 * h.mean(0))
        self.cache = h.mean()
        return self.fc2(h - self.running) + 10.0 * self.calls + self.n


def _data(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 16, generator=g) for _ in range(n)]


def _state(m: Stateful) -> tuple:
    return (
        float(m.calls),
        m.running.clone(),
        m.n,
        list(m.history),
        None if m.cache is None else m.cache.clone(),
    )


def _same_state(a: tuple, b: tuple) -> bool:
    return (
        a[0] == b[0]
        and torch.equal(a[1], b[1])
        and a[2:4] == b[2:4]
        and ((a[4] is None and b[4] is None) or torch.equal(a[4], b[4]))
    )


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))


CONFIGS = {
    "default": PTQConfig(progress=False),
    "auto+empirical": PTQConfig(progress=False, calibration="auto", bias_correction="empirical"),
    "fallback": PTQConfig(progress=False, min_sqnr_db=80.0),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quantized_copy_starts_from_the_users_state(name: str) -> None:
    model = Stateful().eval()
    with torch.no_grad():  # the user ran it before: a state that is not the initial one
        model(torch.randn(8, 16))
    before = _state(model)
    weights = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = ptqkit.quantize(model, _data(), CONFIGS[name])
    assert _same_state(_state(model), before)  # the user's model is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert _same_state(_state(q), before), _state(q)
    assert q.ptq_info.details["state_restored"] > 0
    assert not any(isinstance(h, StateRestore) for h in q._forward_pre_hooks.values())
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        want = ref_model(x)
        qa = copy.deepcopy(q)
        with float_mode(qa):
            as_float = qa(x)
        got = q(x)
    # in float mode the copy is the float model, state included; quantized, it is close to it
    # (W8A8 on two layers; an advanced counter alone would add 10 per pass: below 0 dB)
    torch.testing.assert_close(as_float, want, rtol=1e-5, atol=1e-5)
    assert _sqnr(want, got) > 25.0
    # and it goes on as the user's model does: one more call, one more count
    assert float(q.calls) == before[0] + 1 and q.n == before[2] + 1


def test_tune_trials_start_from_the_users_state() -> None:
    model = Stateful().eval()
    before = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = ptqkit.tune(model, _data(6), PTQConfig(progress=False), budget_s=20)
    assert _same_state(_state(model), before)
    assert _same_state(_state(q), before)


def test_restore_puts_back_in_place_and_reassigned_values() -> None:
    model = Stateful()
    hold(model)
    running = model.running
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 16))
            # each forward started from the recorded state: the count never passes 1
            assert float(model.calls) == 1 and model.n == 1 and model.history == [1]
    assert release(model) > 0
    assert model.running is running and float(model.running.abs().sum()) == 0.0
    assert float(model.calls) == 0 and model.n == 0 and model.history == [] and model.cache is None
    assert release(model) == 0  # no hook left
    model(torch.randn(4, 16))
    assert model.n == 1 and float(model.calls) == 1


def test_a_deep_copy_carries_its_own_recorded_state() -> None:
    model = Stateful()
    hold(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin(torch.randn(4, 16))
    release(twin)
    assert float(twin.calls) == 0 and twin.n == 0
    model.n = 7  # the original's record is its own
    release(model)
    assert model.n == 0
