"""The network's outputs stay float, also when reached through pass-through ops."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import ptqkit
from ptqkit.quant.modules import ActQuant

CFG = ptqkit.PTQConfig(progress=False)


class ConvPermute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(torch.relu(self.conv(x)))
        return y.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


class LinearView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.head = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(torch.relu(self.fc1(x)))
        return torch.flatten(y.view(-1, 2, 3).transpose(1, 2), 1)


class SharedOutput(nn.Module):
    """``head``'s output is both returned (through a view) and consumed by ``tail``."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(12, 8)
        self.tail = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.head(x)
        return y.view(-1, 2, 4), self.tail(y)


def _head_io(qmodel: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input the quantized ``head`` layer receives and the output it computes."""
    seen = {}
    handle = qmodel.get_submodule("head").register_forward_hook(
        lambda m, args, out: seen.update(x=args[0], y=out)
    )
    with torch.no_grad():
        qmodel(x)
    handle.remove()
    return seen["x"], seen["y"]


def _quantizers_fed_by(qmodel: fx.GraphModule, target: str) -> list[str]:
    return [
        n.target
        for n in qmodel.graph.nodes
        if n.op == "call_module"
        and isinstance(qmodel.get_submodule(n.target), ActQuant)
        and any(a.op == "call_module" and a.target == target for a in n.all_input_nodes)
    ]


@pytest.mark.parametrize(
    ("cls", "shape", "passthrough"),
    [
        (ConvPermute, (16, 3, 6, 6), lambda y, x: y.permute(0, 2, 3, 1).reshape(x.shape[0], -1)),
        (LinearView, (16, 12), lambda y, x: torch.flatten(y.view(-1, 2, 3).transpose(1, 2), 1)),
    ],
)
def test_output_through_passthrough_ops_is_not_quantized(cls, shape, passthrough):
    torch.manual_seed(0)
    model = cls().eval()
    data = [torch.randn(*shape) for _ in range(4)]
    qmodel = ptqkit.quantize(model, data, CFG)
    assert qmodel.ptq_info.traced
    assert _quantizers_fed_by(qmodel, "head") == []  # no ActQuant after the last layer
    x = data[0]
    _, head_out = _head_io(qmodel, x)
    with torch.no_grad():
        out = qmodel(x)
    # the output is the last layer's float accumulator, only rearranged
    assert torch.equal(out, passthrough(head_out, x))


def test_output_shared_with_a_quantized_consumer_stays_float():
    torch.manual_seed(0)
    model = SharedOutput().eval()
    data = [torch.randn(16, 12) for _ in range(4)]
    qmodel = ptqkit.quantize(model, data, CFG)
    (aq,) = _quantizers_fed_by(qmodel, "head")  # tail's input is quantized ...
    x = data[0]
    _, head_out = _head_io(qmodel, x)
    with torch.no_grad():
        returned, tail_out = qmodel(x)
        tail_in = qmodel.get_submodule(aq)(head_out)
    assert torch.equal(returned, head_out.view(-1, 2, 4))  # ... the returned copy is not
    assert not torch.equal(tail_in, head_out)
    assert torch.equal(tail_out, qmodel.get_submodule("tail")(tail_in))
