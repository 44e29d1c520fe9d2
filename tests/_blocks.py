"""Small transformer blocks the tests of outlier-moving techniques (SmoothQuant, AWQ) share."""

from __future__ import annotations

import torch
from torch import nn


def outlier_norm(dim: int, channels: tuple[int, ...], gain: float) -> nn.LayerNorm:
    """A LayerNorm whose gain makes ``channels`` about ``gain``× larger, as in real transformers."""
    ln = nn.LayerNorm(dim)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.weight[list(channels)] = gain
        ln.bias.uniform_(-0.1, 0.1)
    return ln


class PostLN(nn.Module):
    """Post-LN (BERT) style: the LayerNorm output also feeds the residual add (no folding)."""

    def __init__(self, dim: int, width: int, ln: nn.LayerNorm) -> None:
        super().__init__()
        self.ln = ln
        self.fc1, self.fc2 = nn.Linear(dim, width), nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return h + self.fc2(torch.relu(self.fc1(h)))


class UntraceablePostLN(PostLN):
    """The same block with data-dependent control flow: captured with hooks, no graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        if h.mean() > 100:  # data-dependent control flow: torch.fx cannot trace it
            h = h * 0
        return h + self.fc2(torch.relu(self.fc1(h)))
