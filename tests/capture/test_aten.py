"""``lift_aten``: the ATen graph of a ``torch.export`` program becomes modules and ``torch``
functions again, and computes exactly what the program computes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptqkit.capture.aten import lift_aten


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.bn(self.conv(x)))
        h = torch.clamp_min(h, 0.1) + torch.clip(h, 0.0, 2.0)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def test_lifted_graph_has_modules_no_aten_ops_and_the_same_outputs():
    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(net, (x,)).module()
    with torch.no_grad():
        want = program(x)
    gm = lift_aten(program)
    kinds = {type(m) for m in gm.modules()}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.Linear} <= kinds, kinds
    left = [
        str(n.target)
        for n in gm.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
    ]
    assert left == [], left  # relu6, clamp_min and clip included
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert {F.relu6, torch.clamp_min, torch.clip} <= targets
    gm.eval()  # train()/eval() work again after lifting
    with torch.no_grad():
        got = gm(x)
    assert torch.equal(got, want) and torch.equal(got, net(x))
