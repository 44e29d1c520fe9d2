"""ptqkit.graph: the one set of op registries and the walks over them (pass-through ops back
to a value's source, clipping activations forward) that placement and the units of fallback /
sensitivity share."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

import ptqkit
from ptqkit.correct.units import layer_quantizers
from ptqkit.graph import (
    ChannelClamp,
    after_activations,
    input_quantizer,
    is_activation,
    module_calls,
    through_passthrough,
)


class _Chain(nn.Module):
    """conv -> relu -> clamp -> maxpool -> flatten -> view -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 3 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.clamp(torch.relu(self.conv(x)), 0, 2)
        return self.fc(torch.flatten(self.pool(y), 1).view(x.shape[0], -1))


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def test_walks_on_a_plain_graph() -> None:
    gm = fx.symbolic_trace(_Chain())
    conv, fc = _node(gm, "conv"), _node(gm, "fc")
    assert after_activations(conv, gm) is _node(gm, "clamp")  # past relu and clamp
    assert after_activations(fc, gm) is fc  # nothing follows: itself
    assert through_passthrough(fc.args[0], gm) is _node(gm, "clamp")  # view, flatten, pool
    assert input_quantizer(fc, gm) is None  # no quantizer in a float graph


def test_channel_clamp_is_an_activation() -> None:
    """CLE's per-channel clamp stands where a ReLU6 stood: the same kind of node."""
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Identity()))
    gm.add_submodule("1", ChannelClamp(torch.zeros(4), torch.full((4,), 6.0)))
    assert is_activation(_node(gm, "_1"), gm)
    assert after_activations(_node(gm, "_0"), gm) is _node(gm, "_1")


class _TensorClamp(nn.Module):
    """A clamp with a tensor bound: placement puts the conv's output quantizer after it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("lo", torch.zeros(1, 4, 1, 1))
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.clamp(self.conv(x), min=self.lo).flatten(1))


def test_a_unit_holds_the_quantizer_placement_put_after_its_activation() -> None:
    """Placement and the units follow one ``is_activation``: the quantizer after a tensor-bound
    clamp is the conv's output quantizer (as for a ReLU), so keeping the conv in float turns it
    off; and a model after CLE (ReLU6 -> ChannelClamp) keeps its units."""
    torch.manual_seed(0)
    data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = ptqkit.quantize(_TensorClamp().eval(), data, ptqkit.PTQConfig())
    units = layer_quantizers(q)
    (after_clamp,) = [u.target for u in _node(q, "clamp").users]
    assert after_clamp in units["conv"] and after_clamp in units["fc"]

    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Conv2d(4, 4, 1), nn.ReLU6())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = ptqkit.quantize(seq.eval(), data, ptqkit.PTQConfig())
        cle = ptqkit.quantize(seq.eval(), data, ptqkit.PTQConfig(cle=True))
    assert any(isinstance(m, ChannelClamp) for m in cle.modules())
    assert layer_quantizers(cle) == layer_quantizers(plain)
    assert all(layer_quantizers(cle)[n] for n in ("0", "2"))


def test_relu6_function_is_an_activation() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
    with gm.graph.inserting_after(_node(gm, "_0")):
        act = gm.graph.call_function(F.relu6, (_node(gm, "_0"),))
    assert is_activation(act, gm)


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(self.a(x)))


def test_module_calls_counts_each_call() -> None:
    assert dict(module_calls(fx.symbolic_trace(_Twice()))) == {"a": 2, "b": 1}
