"""Weight accounting: every module holding weights is quantized or listed as float, with a reason.

A module "holds weights" when it owns (directly, not through a child) a floating-point parameter
or buffer of two or more dimensions: conv kernels, linear and embedding matrices. Norm scales and
biases are vectors and do not count. After wrapping, each such module is either inside a
``QuantLayer`` (``ptq_info.layers``) or listed in ``ptq_info.skipped`` with its reason in
``ptq_info.skip_reasons``; one :class:`PTQWarning` sums up the float share of the weights::

    3 layers holding 41% of the weights stay float: emb (Embedding: no quantized kernel ...), ...
"""

from __future__ import annotations

import torch
from torch import nn

from ..info import PTQInfo
from ..quant.modules import WEIGHT_LAYERS, QuantLayer


def _own_weights(m: nn.Module) -> int:
    tensors = [*m._parameters.values(), *m._buffers.values()]
    return sum(
        t.numel()
        for t in tensors
        if t is not None and t.dim() >= 2 and torch.is_floating_point(t)
    )


def _reason(m: nn.Module) -> str:
    if isinstance(m, WEIGHT_LAYERS):
        return f"{type(m).__name__} left float"
    return f"{type(m).__name__}: ptqkit quantizes only Conv, ConvTranspose and Linear weights"


def account(qmodel: nn.Module, info: PTQInfo, skip_patterns: dict[str, str]) -> None:
    """Fill ``info.skip_reasons`` (and extend ``info.skipped``) for every float module with
    weights, and warn once with their share of all weights. ``skip_patterns`` maps the layers
    skipped by ``config.skip`` to the pattern that matched."""
    inside: set[str] = set()
    quantized = 0
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantLayer):
            inside.update(n for n, _ in m.named_modules(prefix=name))
            quantized += m.weight_fp.numel()
    floats: dict[str, int] = {}
    for name, m in qmodel.named_modules():
        if name in inside or not name:
            continue
        n = _own_weights(m)
        if n == 0:
            continue
        floats[name] = n
        if skip_patterns.get(name):
            info.skip_reasons[name] = f"matches skip pattern {skip_patterns[name]!r}"
        elif name in info.skip_reasons:  # a scope's ``float`` (capture.scopes)
            pass
        else:
            info.skip_reasons[name] = _reason(m)
            if name not in info.skipped:
                info.skipped.append(name)
    total = quantized + sum(floats.values())
    if floats and total:
        share = 100.0 * sum(floats.values()) / total
        listed = ", ".join(f"{k} ({info.skip_reasons[k]})" for k in list(floats)[:5])
        more = f" and {len(floats) - 5} more" if len(floats) > 5 else ""
        info.warn(
            f"{len(floats)} layer{'s' if len(floats) > 1 else ''} holding {share:.0f}% of the "
            f"weights stay float: {listed}{more}"
        )
