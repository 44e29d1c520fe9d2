"""What the tests of the optional runtimes (ExecuTorch, OpenVINO) share: the net whose every
kind of layer a backend must take (branch, concat, residual, depthwise), and a way to make an
optional package missing, so that the error naming its pip extra is checked on every machine."""

from __future__ import annotations

import builtins
import importlib.util
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class BranchNet(nn.Module):
    """conv-ReLU stem; a 1×1 branch and a depthwise-ReLU6 → pointwise branch, concatenated; a
    conv with a residual add + ReLU; global pool; linear (6 conv/linear layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 1)
        self.dw, self.pw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1)
        self.mix, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        c = torch.cat([F.relu(self.a(x)), self.pw(F.relu6(self.dw(x)))], 1)
        x = F.relu(self.mix(c) + c)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def needs(package: str, pip: str) -> pytest.MarkDecorator:
    """Skip unless ``package`` is installed; the reason names what installs it."""
    missing = importlib.util.find_spec(package) is None
    return pytest.mark.skipif(missing, reason=f"{package} not installed ({pip})")


def without(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make every import of ``package`` (and its submodules) raise ``ImportError`` for the rest
    of the test, as on a machine without it."""
    real_import = builtins.__import__

    def blocked(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == package or name.startswith(package + "."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)
