"""Adaptive rounding of the weights (AdaRound, Nagel et al. 2020, "Up or Down? Adaptive Rounding
for Post-Training Quantization").

Rounding each weight to the nearest grid point minimizes the error of the weights, not of the
layer's output. AdaRound learns, per weight, whether to round down or up:

    W̃ = s · (clamp(⌊W/s⌋ + h(V) + z, qmin, qmax) - z),   h(V) = clamp(σ(V)·(ζ - γ) + γ, 0, 1)

(the rectified sigmoid, ``ζ = 1.1``, ``γ = -0.1``), with ``V`` initialized so that ``h(V)`` is the
fractional part of ``W/s`` (``W̃ = W`` inside the grid) and optimized with Adam on

    ‖f(W x + b) - f(W̃ x̂ + b)‖² (summed over channels, mean over rows)
        + λ · Σ (1 - |2·h(V) - 1|^β)

where ``x`` is the layer's input in the float network, ``x̂`` its input in the partially
quantized network (earlier layers already rounded, activations quantized: the "asymmetric"
reconstruction of the paper), and ``f`` the clipping activation that follows the layer (ReLU,
ReLU6, ...; identity otherwise). The regularizer, off for the first 20 % of the iterations,
pushes ``h`` to 0 or 1 while ``β`` anneals from 20 to 2; at the end ``h`` is rounded
(``V ≥ 0`` → up). The scale ``s`` (and ``z``) come from ``config.weight_calibration`` as for
nearest rounding. ``λ = 0.01``.

Layers are processed one at a time in execution order. Memory is bounded: for each layer, at most
:data:`ROWS_PER_BATCH` output positions of each batch are sampled, up to :data:`MAX_ROWS` in all
(a conv's input patches are gathered by indexing for a standard ``nn.Conv2d``, and otherwise
extracted by running the layer itself with an identity kernel, so that any padding its
``forward`` applies is respected); only those rows are kept. Each batch runs
twice per layer, each time only up to that layer (float target, quantized input).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from ..config import PTQConfig
from ..info import PTQInfo
from ..progress import progress
from ..quant.modules import QuantLayer, float_mode, quant_layers
from ..quant.primitives import _broadcast, qparams, storage_dtype
from ..quant.weights import weight_range
from .bias import batches, layer_order, run_until, stop_after

ZETA, GAMMA = 1.1, -0.1
#: regularizer weight λ
REG = 0.01
#: β anneals from BETA_START to BETA_END after the warm-up fraction of the iterations
BETA_START, BETA_END, WARMUP = 20.0, 2.0, 0.2
#: Adam on ``V``: learning rate and moment decays
LR, ADAM_B1, ADAM_B2 = 1e-2, 0.9, 0.999
#: output positions kept per layer, per batch, and rows per optimization step
MAX_ROWS, ROWS_PER_BATCH, ROWS_PER_STEP = 8192, 1024, 1024
#: floats materialized at once when extracting conv patches (bounds memory)
PATCH_BUDGET = 4_000_000


def _identity_kernel(conv: nn.Module) -> torch.Tensor:
    """Weight of a conv with the same geometry whose output channels are its input patches:
    output channel ``g·(cpg·K) + j·K + k`` copies input channel ``g·cpg + j`` at kernel tap
    ``k``."""
    g = conv.groups
    cpg = conv.weight.shape[1]
    k = tuple(conv.weight.shape[2:])
    n = cpg * math.prod(k)
    eye = torch.eye(n, dtype=conv.weight.dtype, device=conv.weight.device).reshape(n, cpg, *k)
    return eye.repeat(g, *([1] * (eye.dim() - 1)))


def _gather_patches(conv: nn.Conv2d, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
    """Patches of a standard zero-padded ``nn.Conv2d`` by indexing (``None`` when the layer
    is not one: a subclass with its own ``forward``, string or non-zero padding)."""
    if (
        type(conv).forward is not nn.Conv2d.forward
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
        or x.dim() != 4
    ):
        return None
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = (
        conv.kernel_size,
        conv.stride,
        conv.dilation,
        conv.padding,
    )
    h_out = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    n, r = rows // (h_out * w_out), rows % (h_out * w_out)
    hi = (r // w_out)[:, None] * sh + torch.arange(kh, device=x.device) * dh  # [P, kh]
    wi = (r % w_out)[:, None] * sw + torch.arange(kw, device=x.device) * dw  # [P, kw]
    c = torch.arange(x.shape[1], device=x.device)
    p = xp[
        n[:, None, None, None], c[None, :, None, None], hi[:, None, :, None], wi[:, None, None, :]
    ]
    return p.reshape(len(rows), conv.groups, -1)


def _patches(conv: nn.Module, x: torch.Tensor, rows: torch.Tensor, per_image: int) -> torch.Tensor:
    """The input patches ``[len(rows), groups, cpg·K]`` of output positions ``rows`` (row
    ``n·per_image + p`` = image ``n``, position ``p``): gathered directly for a standard
    ``nn.Conv2d``, otherwise by running ``conv`` itself with an identity kernel (any padding its
    ``forward`` applies, any dimensionality)."""
    if isinstance(conv, nn.Conv2d):
        got = _gather_patches(conv, x, rows)
        if got is not None:
            return got
    kernel = _identity_kernel(conv)
    width = kernel.shape[0]
    chunk = max(1, PATCH_BUDGET // max(1, width * per_image))
    saved_w, saved_b = conv._buffers["weight"], conv.bias
    out = []
    try:
        conv._buffers["weight"] = kernel
        conv.bias = None
        for a in range(0, x.shape[0], chunk):
            sel = rows[(rows >= a * per_image) & (rows < (a + chunk) * per_image)]
            if sel.numel() == 0:
                continue
            z = conv(x[a : a + chunk])
            z = z.movedim(1, -1).reshape(-1, width)
            out.append(z[sel - a * per_image])
    finally:
        conv._buffers["weight"] = saved_w
        conv.bias = saved_b
    return torch.cat(out).reshape(len(rows), conv.groups, -1)


def _rows(y: torch.Tensor, linear: bool) -> tuple[torch.Tensor, int]:
    """``y`` as ``[rows, channels]`` and the number of rows per image."""
    if linear:
        flat = y.reshape(-1, y.shape[-1])
        return flat, flat.shape[0] // max(1, y.shape[0]) if y.dim() > 1 else 1
    flat = y.movedim(1, -1).reshape(-1, y.shape[1])
    return flat, flat.shape[0] // y.shape[0]


def _collect(
    qmodel: nn.Module, layer: QuantLayer, data: Iterable[Any], config: PTQConfig, seed: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(x̂ patches [P, g, cpg·K], float target [P, Cout])`` for up to ``MAX_ROWS`` rows."""
    inner = layer.layer
    linear = isinstance(inner, nn.Linear)
    xs, ys, kept = [], [], 0
    box: dict[str, torch.Tensor] = {}
    out_hook = lambda m, a, y: box.__setitem__("y", y.detach())  # noqa: E731
    in_hook = lambda m, a: box.__setitem__("x", a[0].detach())  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    for i, args, kwargs in batches(data, config, qmodel):
        box.clear()
        h = layer.register_forward_hook(out_hook)
        try:
            with torch.no_grad(), float_mode(qmodel), stop_after(layer):
                run_until(qmodel, args, kwargs, i)
        finally:
            h.remove()
        if "y" not in box:
            continue
        h = inner.register_forward_pre_hook(in_hook)
        try:
            with torch.no_grad(), stop_after(layer):
                run_until(qmodel, args, kwargs, i)
        finally:
            h.remove()
        y, per_image = _rows(box["y"], linear)
        take = min(y.shape[0], ROWS_PER_BATCH, MAX_ROWS - kept)
        rows = torch.randperm(y.shape[0], generator=gen)[:take].sort().values.to(y.device)
        ys.append(y[rows])
        x = box["x"]
        with torch.no_grad():
            if linear:
                xs.append(x.reshape(-1, x.shape[-1])[rows].unsqueeze(1))
            else:
                xs.append(_patches(inner, x, rows, per_image))
        kept += take
        if kept >= MAX_ROWS:
            break
    if not ys:
        return None
    return torch.cat(xs).float(), torch.cat(ys).float()


def _activation(qmodel: nn.Module, name: str) -> Any:
    """The clipping activation right after layer ``name`` as a function on ``[rows, C]``."""
    if not isinstance(qmodel, fx.GraphModule):
        return None
    from ..equalize.cle import _activation_bounds

    for node in qmodel.graph.nodes:
        if node.op == "call_module" and node.target == name and len(node.users) == 1:
            bounds = _activation_bounds(next(iter(node.users)), qmodel)
            if bounds is None:
                return None
            lo, hi = (torch.as_tensor(v, dtype=torch.float32) for v in bounds)
            return lambda t: torch.minimum(torch.maximum(t, lo.to(t.device)), hi.to(t.device))
    return None


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def round_layer(
    layer: QuantLayer,
    scale: torch.Tensor,
    zp: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    act: Any,
    iters: int,
    seed: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Learn the rounding of ``layer``'s float weight on rows ``x`` → ``target``; returns the
    integer weight and the reconstruction losses (nearest rounding, AdaRound) on those rows."""
    spec = layer.spec
    w = layer.weight_fp.float()
    s = _broadcast(scale.to(w.device), w, spec.axis)
    z = _broadcast(zp.to(w.device).float(), w, spec.axis)
    floor = torch.floor(w / s)
    rest = (w / s - floor).clamp(0, 1)
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    v = torch.log(p / (1 - p)).requires_grad_(True)
    bias = layer.bias.detach().float() if layer.bias is not None else None
    g = x.shape[1]
    f = act if act is not None else (lambda t: t)
    goal = f(target)

    def forward(wq: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("bgk,gok->bgo", xb, wq.reshape(g, wq.shape[0] // g, -1))
        out = out.reshape(xb.shape[0], -1)
        return f(out + bias if bias is not None else out)

    def soft(h: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(floor + h + z, spec.qmin, spec.qmax) - z) * s

    def loss_of(wq: torch.Tensor) -> float:
        with torch.no_grad():
            return float((forward(wq, x) - goal).pow(2).sum(1).mean())

    nearest = loss_of((torch.clamp(torch.round(w / s) + z, spec.qmin, spec.qmax) - z) * s)
    m1, m2 = torch.zeros_like(v), torch.zeros_like(v)  # Adam moments (written out: the
    # torch.optim step pulls in torch._dynamo, seconds of import for a few lines of arithmetic)
    gen = torch.Generator().manual_seed(seed)
    warm = int(WARMUP * iters)
    n = x.shape[0]
    for t in range(iters):
        idx = torch.randint(0, n, (min(n, ROWS_PER_STEP),), generator=gen).to(x.device)
        h = _h(v)
        rec = (forward(soft(h), x[idx]) - goal[idx]).pow(2).sum(1).mean()
        if t >= warm:
            frac = (t - warm) / max(1, iters - warm)
            beta = BETA_END + (BETA_START - BETA_END) * (1 - frac)
            loss = rec + REG * (1 - (2 * h - 1).abs().pow(beta)).sum()
        else:
            loss = rec
        (grad,) = torch.autograd.grad(loss, v)
        with torch.no_grad():
            m1.mul_(ADAM_B1).add_(grad, alpha=1 - ADAM_B1)
            m2.mul_(ADAM_B2).addcmul_(grad, grad, value=1 - ADAM_B2)
            step = LR / (1 - ADAM_B1 ** (t + 1))
            denom = (m2 / (1 - ADAM_B2 ** (t + 1))).sqrt_().add_(1e-8)
            v.addcdiv_(m1, denom, value=-step)
    up = (v.detach() >= 0).float()
    q = torch.clamp(floor + up + z, spec.qmin, spec.qmax)
    learned = loss_of((q - z) * s)
    return q.to(storage_dtype(spec)), {"nearest": nearest, "adaround": learned}


def adaround(qmodel: nn.Module, data: Iterable[Any], config: PTQConfig, info: PTQInfo) -> nn.Module:
    """Quantize the weights of every :class:`QuantLayer` of ``qmodel`` with AdaRound (see the
    module docstring), layer by layer on ``data``; records ``info.details["adaround"]``
    (reconstruction loss with nearest rounding and with AdaRound, per layer, on the sampled rows).
    """
    layers = quant_layers(qmodel)
    if not layers:
        info.warn("AdaRound: the model has no layer with weights to round; nothing was done")
        info.details["adaround"] = {"layers": {}}
        return qmodel
    order = layer_order(qmodel, data, config)
    report: dict[str, Any] = {}
    for k, name in enumerate(progress(order, config.progress, "adaround")):
        layer = layers[name]
        lo, hi = weight_range(layer, config.weight_calibration)
        scale, zp = qparams(lo, hi, layer.spec)
        rows = None
        if layer.weight_fp.numel() > 0:
            rows = _collect(qmodel, layer, data, config, config.seed + k)
        if rows is None:
            layer.set_weight_range(lo, hi)
            report[name] = {"skipped": "no calibration data reached it: nearest rounding"}
            info.warn(f"AdaRound: {name} never ran on the calibration data; rounded to nearest")
            continue
        x, y = rows
        torch.manual_seed(config.seed + k)
        with torch.enable_grad():
            q, losses = round_layer(
                layer,
                scale,
                zp,
                x,
                y,
                _activation(qmodel, name),
                config.adaround_iters,
                config.seed + k,
            )
        layer.set_quantized(q, scale, zp)
        report[name] = {**losses, "rows": int(x.shape[0])}
    info.details["adaround"] = {
        "layers": report,
        "iters": config.adaround_iters,
        "weight_calibration": config.weight_calibration,
    }
    return qmodel


__all__ = ["adaround", "round_layer"]
