"""Block reconstruction (BRECQ, Li et al. 2021): AdaRound's learned rounding, fitted on the output
of a whole block instead of one layer (``AdaRoundOptions.granularity = "block"``).

Layer-wise AdaRound fits each layer's rounding to that layer's float output; in a network of
4-bit depthwise convolutions the errors the layers cannot fix alone compound. BRECQ fits the
roundings ``h(V)`` of all the layers of a block (:mod:`ptqkit.correct.blocks`: a residual or
inverted-residual block, or ``block_layers`` layers of a chain) jointly, on

    ‖B̃(x̂) - B(x)‖² (summed over channels, mean over samples and positions)
        + λ · Σ_layers Σ (1 - |2·h(V) - 1|^β)

where ``B`` is the float block on its float input ``x`` (the float network's value at the
block's input), ``B̃`` the block with soft-rounded weights (``W̃(V)`` as in AdaRound) and its
activation quantizers on, run on ``x̂``, the block's input in the network whose earlier blocks
are already rounded. The activation quantizers pass gradients straight through inside their
range (PyTorch's fake-quantize operators; as in BRECQ and QDrop). ``β``, ``λ``, the warm-up,
Adam and the early stop are AdaRound's (:mod:`ptqkit.correct.rounding`); gradients come from
autograd. Each step draws ``block_batch`` samples (seeded); ``adaround_iters`` steps per block.

Not from the paper: the output loss is the plain squared error, not BRECQ's Fisher-weighted one
(which needs the task loss's gradients, i.e. labels). Forward work: one float and one quantized
pass over the calibration samples, block after block (``O(depth)``); memory: the two streams'
values at the current block input, for at most ``block_samples`` samples.

Measured (``python bench/run_all.py --models resnet_fmnist,mobilenetv2_fmnist --rows AdaRound``,
bench/ADAROUND.md; W4A8, default config, 500 steps per block, seed 0, 10,000 test images, 2
cores): MobileNetV2-style drop 0.33 in 110 s (layer by layer: 0.07-0.18 in 15-18 s over 3
seeds), ResNet-style 0.19 in 51 s (layer by layer: 0.08-0.22 in 8 s). At AdaRound's step count
it is slower and not better on these models; BRECQ's own setting is 20,000 steps per block.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from ..calibrate.weights import weight_range
from ..config import PTQConfig
from ..info import PTQInfo
from ..progress import progress
from ..quant.modules import ActQuant, float_mode, quant_layers
from ..quant.primitives import qparams
from ..walk import batches, placeholder_values
from .blocks import Block, run, split, why_not
from .rounding import SoftRounding, adam_step, beta_at, h_of, penalty, settled

#: samples per forward pass when a block runs on all the samples (no gradient)
CHUNK = 64


def _soft_weight(r: SoftRounding) -> tuple[torch.Tensor, torch.Tensor]:
    """``W̃(V)`` and ``h(V)``, differentiable in ``r.v``."""
    h = h_of(r.v)
    return r.dequant(torch.clamp(r.base + h, r.spec.qmin, r.spec.qmax)), h


def _straight_through(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Run a module of the block; an activation quantizer passes the gradient straight through
    inside its grid (zero outside), with the forward value of its own ``fake_quant``."""
    x = args[0] if args else None
    if (
        isinstance(module, ActQuant)
        and module.mode == "quant"
        and isinstance(x, torch.Tensor)
        and torch.is_floating_point(x)
    ):
        return _ste(module, x)
    return module(*args, **kwargs)


def _ste(module: ActQuant, x: torch.Tensor) -> torch.Tensor:
    s, z, spec = module.scale.float(), module.zero_point.float(), module.spec
    lo, hi = (spec.qmin - z) * s, (spec.qmax - z) * s
    if s.dim() > 0:  # per channel, along the quantizer's axis
        shape = [1] * x.dim()
        shape[spec.axis] = -1
        lo, hi = lo.reshape(shape), hi.reshape(shape)
    inside = torch.minimum(torch.maximum(x, lo.to(x.dtype)), hi.to(x.dtype))
    return inside + (module(x.detach()) - inside).detach()


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    err = (out - target).pow(2)
    return err.sum(1).mean() if err.dim() > 1 else err.mean()


def _inputs(
    gm: fx.GraphModule, data: Iterable[Any], config: PTQConfig, limit: int
) -> torch.Tensor | str:
    """The graph's (single used) input over the calibration batches, up to ``limit`` samples;
    or why there is none."""
    feeds = [(a, k) for _, a, k in batches(data, config, gm, max_samples=limit)]
    if not feeds:
        return "the calibration data has no batch"
    values = placeholder_values(gm, feeds)
    used = [values[n] for n in values if n.users]
    if len(used) != 1 or not all(isinstance(v, torch.Tensor) for v in used[0]):
        return "the model's input is not a single tensor"
    return torch.cat([v.detach() for v in used[0]])


def _run_all(gm: fx.GraphModule, block: Block, x: torch.Tensor) -> torch.Tensor:
    """``block`` on all the samples ``x``, without gradients, :data:`CHUNK` at a time."""
    with torch.no_grad():
        return torch.cat([run(gm, block, c) for c in x.split(CHUNK)])


def _fit(
    gm: fx.GraphModule,
    block: Block,
    x_q: torch.Tensor,
    target: torch.Tensor,
    config: PTQConfig,
    seed: int,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Learn the roundings of ``block``'s layers and set their integer weights; returns the
    record and the block's output on ``x_q`` with those weights. A layer a scope turns AdaRound
    off for (:meth:`PTQConfig.off_layers`) is rounded to nearest throughout: the others learn
    theirs around it."""
    opts = config.adaround_options
    found = quant_layers(gm)
    layers = {n: found[n] for n in block.layers}
    off = config.off_layers("adaround", layers)
    roundings: dict[str, tuple[SoftRounding, torch.Tensor, torch.Tensor]] = {}
    for name, layer in layers.items():
        lo, hi = weight_range(layer, config.weight_calibration)
        scale, zp = qparams(lo, hi, layer.spec)
        roundings[name] = (SoftRounding(layer, scale, zp), scale, zp)
    rs = [r for n, (r, _, _) in roundings.items() if n not in off]
    for r in rs:
        r.v.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    n = x_q.shape[0]
    batch = min(n, opts.block_batch)

    def install(soft: bool) -> list[torch.Tensor]:
        """Set every layer's weight to ``W̃(V)`` (``soft``) or to nearest rounding; the ``h``."""
        hs = []
        for name, layer in layers.items():
            r = roundings[name][0]
            if soft and name not in off:
                w, h = _soft_weight(r)
                hs.append(h)
            else:
                w = r.dequant(r.nearest_q)
            layer.layer._buffers["weight"] = w.to(layer.weight_fp.dtype)
        return hs

    with torch.no_grad():
        install(soft=False)
    nearest = float(_loss(_run_all(gm, block, x_q), target))
    steps = config.adaround_iters if rs else 0  # (every layer off: nothing to learn)
    for t in range(steps):
        if settled(t, config.adaround_iters, opts, rs):
            steps = t
            break
        beta = beta_at(t, config.adaround_iters, opts)
        pick = torch.randperm(n, generator=gen)[:batch]
        hs = install(soft=True)
        loss = _loss(run(gm, block, x_q[pick], _straight_through), target[pick])
        if beta is not None and opts.reg > 0:
            loss = loss + opts.reg * sum(penalty(h, beta) for h in hs)
        grads = torch.autograd.grad(loss, [r.v for r in rs])
        with torch.no_grad():
            for r, g in zip(rs, grads, strict=True):
                adam_step(r, g, opts.lr)
    for name, layer in layers.items():
        r, scale, zp = roundings[name]
        r.v.requires_grad_(False)
        if name in off:  # the integers of nearest rounding, as the weights stage writes them
            layer.set_weight_range(*weight_range(layer, config.weight_calibration))
        else:
            layer.set_quantized(r.hard(), scale, zp)
    out = _run_all(gm, block, x_q)
    record = {
        "layers": list(layers),
        "nearest": nearest,
        "adaround": float(_loss(out, target)),
        "steps": steps,
        "samples": n,
        **({"off_by_scope": off} if off else {}),
    }
    return record, out


def reconstruct_blocks(
    qmodel: nn.Module, data: Iterable[Any], config: PTQConfig, info: PTQInfo
) -> str | None:
    """Block reconstruction of every :class:`QuantLayer` of ``qmodel`` (see the module
    docstring); records ``info.details["adaround"]``. Returns why it could not run (the caller
    then rounds layer by layer), or ``None`` when it did."""
    if not isinstance(qmodel, fx.GraphModule):
        return "the model could not be traced into a graph"
    opts = config.adaround_options
    blocks = split(qmodel, opts.block_layers)
    if blocks is None:
        return str(why_not(qmodel))
    x = _inputs(qmodel, data, config, opts.block_samples)
    if isinstance(x, str):
        return x
    x_q, x_f = x, x
    report = []
    for k, block in enumerate(progress(blocks, config.progress, "block reconstruction")):
        with float_mode(qmodel):
            y_f = _run_all(qmodel, block, x_f)
        record, x_q = _fit(qmodel, block, x_q, y_f, config, config.seed + k)
        report.append(record)
        x_f = y_f
    layers: dict[str, Any] = {}
    for k, rec in enumerate(report):
        for name in rec["layers"]:
            layers[name] = {"block": k}
            if name in rec.get("off_by_scope", {}):
                layers[name]["off_by_scope"] = rec["off_by_scope"][name]
    info.details["adaround"] = {
        "granularity": "block",
        "blocks": report,
        "layers": layers,
        "iters": config.adaround_iters,
        "weight_calibration": config.weight_calibration,
        "engine": {"cached_inputs": True, "samples": int(x.shape[0])},
    }
    return None


__all__ = ["reconstruct_blocks"]
