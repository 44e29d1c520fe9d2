"""The typed accessors (ptqkit.typed) return what torch holds and fail loudly, naming the module
or node, where the model breaks what they state."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import fx, nn

from ptqkit.errors import ModelError
from ptqkit.typed import input_node, optional_tensor_attr, submodule, target_name, tensor_attr


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3, bias=False)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(self.act(self.fc(x)), 1.0)


def test_tensor_attributes():
    fc = nn.Linear(4, 3, bias=False)
    assert tensor_attr(fc, "weight") is fc.weight
    assert optional_tensor_attr(fc, "bias") is None
    assert optional_tensor_attr(nn.RMSNorm(4), "bias") is None  # no such attribute at all
    with pytest.raises(ModelError, match=r"ReLU\.weight is NoneType"):
        tensor_attr(nn.ReLU(), "weight")
    with pytest.raises(ModelError, match=r"Sequential\.fc is Linear"):
        optional_tensor_attr(nn.Sequential(OrderedDict(fc=nn.Linear(2, 2))), "fc")


def test_graph_accessors():
    gm = fx.symbolic_trace(_Net())
    nodes = {n.name: n for n in gm.graph.nodes}
    fc, act, add = nodes["fc"], nodes["act"], nodes["add"]
    assert target_name(fc) == "fc"
    assert submodule(gm, act) is gm.act
    assert input_node(act) is fc
    assert input_node(add) is act
    with pytest.raises(ModelError, match="argument 1 is not the output of a node"):
        input_node(add, 1)  # the constant 1.0
    with pytest.raises(ModelError, match=r"add \(call_function\) has no name target"):
        target_name(add)
