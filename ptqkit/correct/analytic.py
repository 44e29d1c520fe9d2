"""Analytic (data-free) bias correction, ``bias_correction="analytic"`` (Nagel et al. 2019,
section 4.2): ``b ← b - ε·E[x]`` with ``E[x]`` propagated through the graph from the BatchNorm
statistics recorded at folding time (see :mod:`ptqkit.correct.bias`).

It has no data to check a correction on; what it assumes is recorded with it
(``"checked": {}``, ``"assumes"``): the inputs of each corrected layer follow the folded
BatchNorm's ``N(β, γ²)`` per channel (through clipping activations, adds, average pooling).
"""

from __future__ import annotations

import operator
from collections.abc import Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import ModelError
from ..graph import activation_bounds, input_channel_view, is_flatten_1
from ..info import PTQInfo
from ..quant.modules import ActQuant, QuantLayer, quant_layers
from ..typed import submodule, target_name
from .affine import add_to_bias as _add_to_bias


def clipped_normal_mean(
    mu: torch.Tensor, sigma: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> torch.Tensor:
    """``E[clamp(X, lo, hi)]`` for ``X ~ N(mu, sigma²)``, per channel (``±inf`` bounds allowed)."""
    mu, sigma = mu.double(), sigma.double()
    lo, hi = torch.broadcast_to(lo.double(), mu.shape), torch.broadcast_to(hi.double(), mu.shape)
    normal = torch.distributions.Normal(0.0, 1.0)
    safe = sigma.clamp_min(1e-12)
    a, b = (lo - mu) / safe, (hi - mu) / safe
    cdf_a, cdf_b = normal.cdf(a), normal.cdf(b)
    pdf = lambda t: torch.where(torch.isfinite(t), normal.log_prob(t).exp(), 0.0)  # noqa: E731
    term_lo = torch.where(torch.isfinite(lo), lo * cdf_a, 0.0)
    term_hi = torch.where(torch.isfinite(hi), hi * (1 - cdf_b), 0.0)
    e = term_lo + term_hi + mu * (cdf_b - cdf_a) + sigma * (pdf(a) - pdf(b))
    return torch.where(sigma > 1e-12, e, torch.minimum(torch.maximum(mu, lo), hi))


_PASS = (ActQuant, nn.Identity, nn.Dropout)
_MEAN_PASS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten)


def _input_means(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Expected input per channel of every :class:`QuantLayer` where BatchNorm statistics
    allow it (see the module docstring), and why the others have none."""
    env: dict[fx.Node, tuple[torch.Tensor, torch.Tensor | None] | None] = {}
    means, why = {}, {}
    for node in gm.graph.nodes:
        val: tuple[torch.Tensor, torch.Tensor | None] | None = None
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        inp = env.get(src) if src is not None else None
        mod = submodule(gm, node) if node.op == "call_module" else None
        if isinstance(mod, QuantLayer):
            if inp is not None:
                means[target_name(node)] = inp[0]
            else:
                why[target_name(node)] = "its input has no BatchNorm statistics upstream"
            m, s = getattr(mod.layer, "bn_mean", None), getattr(mod.layer, "bn_std", None)
            if isinstance(m, torch.Tensor) and isinstance(s, torch.Tensor):
                val = (m.double(), s.double())
        elif isinstance(mod, _PASS) or (node.op == "call_function" and node.target is F.dropout):
            val = inp
        elif isinstance(mod, _MEAN_PASS) or is_flatten_1(node, gm):
            val = None if inp is None else (inp[0], None)
        elif node.op in ("call_function", "call_method") and node.target in (
            operator.add,
            torch.add,
            "add",
        ):
            vals = [
                v for a in node.args[:2] if isinstance(a, fx.Node) and (v := env.get(a)) is not None
            ]
            if len(vals) == 2:  # both inputs have statistics
                (m1, s1), (m2, s2) = vals
                std = None if s1 is None or s2 is None else torch.sqrt(s1**2 + s2**2)
                val = (m1 + m2, std)
        elif node.op != "placeholder" and inp is not None and inp[1] is not None:
            bounds = activation_bounds(node, gm)
            if bounds is not None:
                lo, hi = (torch.as_tensor(v, dtype=torch.float64) for v in bounds)
                val = (clipped_normal_mean(inp[0], inp[1], lo, hi), None)
        env[node] = val
    return means, why


def analytic(qmodel: nn.Module, info: PTQInfo, off: Collection[str] = ()) -> dict[str, Any]:
    """Analytic bias correction of ``qmodel``'s quantized layers but those in ``off`` (turned
    off by a scope); returns the record."""
    if not isinstance(qmodel, fx.GraphModule):
        raise ModelError(
            "analytic bias correction propagates BatchNorm statistics through the graph, but the "
            "model could not be traced; use bias_correction='empirical' with calibration data"
        )
    layers = quant_layers(qmodel)
    if not any(
        isinstance(getattr(q.layer, "bn_mean", None), torch.Tensor) for q in layers.values()
    ):
        raise ModelError(
            "analytic (data-free) bias correction needs BatchNorm statistics, and this model has "
            "no BatchNorm folded into its layers (no BatchNorm, or fold_bn=False); use "
            "bias_correction='empirical' with calibration data"
        )
    means, why = _input_means(qmodel)
    shifts = {}
    for name, mu in means.items():
        q = layers[name]
        if not q.quantized or name in off:
            continue
        eps = (q.weight.double() - q.weight_fp.double()).cpu()
        view = input_channel_view(q.layer, eps, mu.numel())
        if view is None:
            why[name] = "its input channels do not match the statistics"
            continue
        g, _, cpg, _ = view.shape
        delta = (view * mu.reshape(g, 1, cpg, 1)).sum(dim=(2, 3)).reshape(-1)
        _add_to_bias(q, -delta)
        shifts[name] = float(delta.abs().max())
    if not shifts:
        info.warn(
            "analytic bias correction found no layer whose input statistics follow from "
            "BatchNorm statistics; nothing was corrected"
        )
    return {
        "mode": "analytic",
        "corrected": shifts,
        "not_corrected": why,
        "checked": {},
        "assumes": "each corrected layer's input follows the folded BatchNorm statistics "
        "(data-free: no data to check the correction on)",
    }


__all__ = ["analytic", "clipped_normal_mean"]
