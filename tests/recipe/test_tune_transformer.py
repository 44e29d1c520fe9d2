"""tune knows the transformer techniques (issue 25 item 7): dynamic vs static activations, GPTQ
vs AWQ vs nearest rounding, offered where they apply (else skipped with the reason), each trial
recorded with its estimated and measured cost, chosen only by the paired test; every chosen
model compared with the FP32 model (its error never above the base recipe's)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit import PTQConfig, QuantSpec
from ptqkit.recipe.view import model_view
from ptqkit.techniques import candidates

D, T = 32, 8


class Block(nn.Module):
    """A pre-LN transformer MLP block on token sequences ``[B, T, D]`` (no residual add: its
    inputs would keep static per-tensor quantizers, the dynamic form being the Linears')."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.up = nn.Linear(D, 2 * D)
        self.act = nn.GELU()
        self.down = nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(self.norm(self.inp(x)))))


def _outlier_tokens(n: int, seed: int) -> list[torch.Tensor]:
    """Batches of sequences whose first token carries one outlier channel (x 1000, an
    "attention sink"): a static per-tensor range spans it and rounds every other token's
    values to a few steps; a scale per token (row) follows each token."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(16, T, D, generator=g)
        x[:, 0, 3] = 1000.0
        out.append(x)
    return out


def _rel_err(model: nn.Module, q: nn.Module, data: list[torch.Tensor], tokens: int = 0) -> float:
    """``||q(x) - f(x)||² / ||f(x)||²`` against the FP32 model (from token ``tokens`` on)."""
    with torch.no_grad():
        f = torch.cat([model(x) for x in data])
        y = torch.cat([q(x) for x in data])
    if tokens:
        f, y = f[:, tokens:], y[:, tokens:]
    return float((y - f).pow(2).sum() / f.pow(2).sum())


def _tune(model: nn.Module, data: list, cfg: PTQConfig, budget: float = 60.0) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ptqkit.tune(model, data, cfg, budget_s=budget)


def _trials(q: nn.Module) -> dict[str, dict]:
    return {t["name"]: t for t in q.ptq_info.details["recipe"]["trials"]}


def _base(model: nn.Module, data: list, cfg: PTQConfig) -> nn.Module:
    """The base recipe as tune would return it unchosen: quantized on all the data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ptqkit.quantize(model, data, cfg)


def test_dynamic_activations_chosen_where_static_ranges_lose() -> None:
    torch.manual_seed(0)
    model = Block().eval()
    data, test = _outlier_tokens(8, 1), _outlier_tokens(4, 2)
    cfg = PTQConfig(progress=False)
    q = _tune(model, data, cfg)
    trials = _trials(q)
    dyn = trials["dynamic activations"]
    assert dyn["status"] == "ran" and dyn.get("best_so_far"), dyn
    assert dyn["expected_s"] > 0 and dyn["quantize_s"] > 0  # estimated and measured
    assert "better" in dyn["decision"]
    rec = q.ptq_info.details["recipe"]
    assert "dynamic activations" in rec["chosen"]
    scopes = rec["changes"]["scopes"]
    assert scopes[-1]["activations"]["dynamic"] and scopes[-1]["pattern"] == "Linear"
    # weights stay 8 bits: the low-bit candidates are not offered, with the reason
    for name in ("GPTQ", "AWQ", "AWQ + GPTQ"):
        assert trials[name]["status"] == "skipped" and "at most 4 bits" in trials[name]["reason"]
    b = _base(model, data, cfg)
    assert _rel_err(model, q, test) <= _rel_err(model, b, test)
    # the ordinary tokens: lost to the outlier's range with static ranges, kept per token
    chosen, base = _rel_err(model, q, test, 1), _rel_err(model, b, test, 1)
    assert base > 0.5 and chosen < 0.01 * base, (chosen, base)


def _correlated(n: int, seed: int, k: int = 64) -> list[torch.Tensor]:
    """Inputs on a few directions (``x = z·A`` plus a little noise, ``rank(A) = 4``): their
    Hessian ``XXᵀ`` is far from diagonal, which GPTQ's error feedback uses and nearest rounding
    does not (it rounds each weight alone)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(4, k, generator=torch.Generator().manual_seed(7))
    return [
        torch.randn(32, 4, generator=g) @ a + 0.05 * torch.randn(32, k, generator=g)
        for _ in range(n)
    ]


def test_gptq_chosen_for_w4_weight_only_on_correlated_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    data, test = _correlated(8, 1), _correlated(4, 2)
    cfg = PTQConfig(weights=QuantSpec(bits=4, per_channel=True), activations=None, progress=False)
    q = _tune(model, data, cfg)
    trials = _trials(q)
    g = trials["GPTQ"]
    assert g["status"] == "ran" and g.get("best_so_far"), g
    assert g["expected_stage_s"]["gptq"] > 0 and g["stage_s"]["gptq"] > 0  # estimated, measured
    assert q.ptq_info.details["recipe"]["changes"]["gptq"] is not None
    assert "does not apply" in trials["dynamic activations"]["reason"]
    assert "weight-only" in trials["dynamic activations"]["reason"]
    for name in ("AWQ", "AWQ + GPTQ"):  # no LayerNorm for AWQ's scales
        assert "LayerNorm" in trials[name]["reason"], trials[name]
    chosen, base = _rel_err(model, q, test), _rel_err(model, _base(model, data, cfg), test)
    assert chosen < 0.5 * base, (chosen, base)
    # with GPTQ the incumbent, AdaRound is tried in its place (both choose the integers)
    ada = trials["AdaRound"]
    assert ada["status"] != "failed" and ada.get("changes", {}).get("gptq", "x") is None, ada


class Exact(nn.Module):
    """LayerNorm -> Linear -> Linear whose weights lie on the 4-bit per-channel grid (each row
    holds +-7 steps): nearest rounding is exact, so GPTQ and AWQ cannot be better."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.norm = nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, D), nn.Linear(D, 8)
        for fc in (self.fc1, self.fc2):
            steps = torch.randint(-7, 8, fc.weight.shape, generator=g).float()
            steps[:, 0] = 7.0
            with torch.no_grad():
                fc.weight.copy_(steps * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(self.norm(x)))


def test_base_kept_where_no_candidate_is_better() -> None:
    model = Exact().eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(16, T, D, generator=g) for _ in range(8)]
    test = [torch.randn(16, T, D, generator=g) for _ in range(2)]
    cfg = PTQConfig(weights=QuantSpec(bits=4, per_channel=True), activations=None, progress=False)
    q = _tune(model, data, cfg)
    trials = _trials(q)
    for name in ("GPTQ", "AWQ", "AWQ + GPTQ"):  # tried (AWQ: fc1 reads the LayerNorm), tie
        assert trials[name]["status"] == "ran", trials[name]
        assert not trials[name].get("best_so_far"), trials[name]
        assert trials[name]["expected_s"] > 0 and trials[name]["quantize_s"] > 0
    rec = q.ptq_info.details["recipe"]
    assert rec["chosen"] == "base", rec["chosen"]
    assert _rel_err(model, q, test) <= _rel_err(model, _base(model, data, cfg), test) + 1e-12


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("bits", [8, 4])
def test_cnn_skips_the_transformer_candidates_with_a_reason(bits: int) -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    data = [torch.randn(8, 3, 12, 12) for _ in range(4)]
    cfg = PTQConfig(weights=QuantSpec(bits=bits, per_channel=True), progress=False)
    view = model_view(_base(model, data, cfg), data, 32)
    assert [lv.rows for lv in view.layers] == [144.0, 144.0, 1.0]
    why = {c.name: c.skip_reason(view, cfg) for c in candidates()}
    assert "multiply-adds" in why["dynamic activations"]  # the classifier: ~0.1% of the work
    assert "LayerNorm" in why["AWQ"] if bits == 4 else "at most 4 bits" in why["AWQ"]
    assert (why["GPTQ"] is None) == (bits == 4)  # GPTQ on convolutions: offered at W4
    if bits == 8:
        q = _tune(model, data, cfg, budget=5.0)
        trials = _trials(q)
        for name in ("dynamic activations", "GPTQ", "AWQ", "AWQ + GPTQ"):
            assert trials[name]["status"] == "skipped", trials[name]
            assert trials[name]["reason"].startswith("does not apply: ")


def _cand(name: str):
    return next(c for c in candidates() if c.name == name)


def test_changes_are_computed_from_the_incumbent() -> None:
    from ptqkit import GPTQOptions, Scope
    from ptqkit.techniques.awq import AWQOptions

    kept = Scope("fc*", weights=QuantSpec(bits=4, per_channel=True))
    cfg = PTQConfig(scopes=(kept,), gptq=GPTQOptions(damp=0.1), progress=False)
    dyn = _cand("dynamic activations").apply(cfg)
    assert dyn.scopes[0] == kept and dyn.scopes[1].activations == QuantSpec(
        bits=8, symmetric=False, per_channel=True, dynamic=True
    )
    inc = cfg.replace(techniques={"awq": AWQOptions(grid=5)})
    awq = _cand("AWQ").apply(inc)
    assert awq.gptq is None and awq.techniques["awq"] == AWQOptions(grid=5)
    both = _cand("AWQ + GPTQ").apply(inc)
    assert both.gptq == GPTQOptions(damp=0.1) and both.techniques["awq"] == AWQOptions(grid=5)


def test_gptq_cost_grows_with_the_hessians_and_factorizations() -> None:
    from ptqkit.technique import CostBasis, LayerView, ModelView
    from ptqkit.techniques.gptq import C_FACTOR, T_COL, T_LAYER, estimate_seconds

    cfg = PTQConfig(gptq=True, progress=False)
    one = LayerView("fc", True, out=256, k=512, groups=1, rows=16.0)
    view = ModelView((one,), samples=256)
    rate = 1e9
    got = estimate_seconds(cfg, CostBasis(2.0, 1, view=view, mm_rate=lambda: rate))
    n = 128  # GPTQOptions.samples of the 256 calibration samples: half a pass
    macs = 16 * n * (512**2 + 256 * 512) + C_FACTOR * 512**3 + 256 * 512**2
    assert got == pytest.approx(n / 256 * 2.0 + macs / rate + 512 * T_COL + T_LAYER)
    wide = ModelView((LayerView("fc", True, 256, 1024, 1, 16.0),), samples=256)
    work = got - n / 256 * 2.0  # twice K: the Hessians x4, the factorizations x8
    assert estimate_seconds(cfg, CostBasis(0.0, 1, view=wide, mm_rate=lambda: rate)) > 4 * work
    # without a view of the layers: the prior in calibration passes
    assert estimate_seconds(cfg, CostBasis(2.0, 1)) == pytest.approx(30 * 2.0)
