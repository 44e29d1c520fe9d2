"""Cross-layer equalization (CLE) with high-bias absorption (Nagel et al. 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction"), on the prepared graph after
BatchNorm folding, before calibration. The float function of the network does not change.

Pairs. Two wrapped layers ``L1 → L2`` are a pair when the tensor between them flows through a
single-user chain of ops that commute with a positive per-channel scaling: at most one clipping
activation (ReLU, ReLU6, Hardtanh, clamp, or none), activation quantizers (still off),
identity/dropout, max-pooling, adaptive average pooling and ``flatten(x, 1)`` into a Linear.
A depthwise chain ``conv → dw-conv → conv`` is two pairs sharing the depthwise layer.

Equalization. With ``r1_i = max|W1[i, ...]|`` (output channel ``i`` of ``L1``) and
``r2_i = max|W2[:, i, ...]|`` (input channel ``i`` of ``L2``; per group for grouped convs)::

    s_i = √(r1_i · r2_i) / r2_i,   W1[i] ← W1[i] / s_i,  b1[i] ← b1[i] / s_i,
                                   W2[:, i] ← W2[:, i] · s_i

after which both ranges equal ``√(r1_i · r2_i)``. Pairs are swept in graph order until every
``s_i`` is within ``1e-3`` of 1 (at most :data:`MAX_SWEEPS` sweeps), in float64, and the weights
are written back once.

Clipping activations. ``relu(x/s) = relu(x)/s`` for ``s > 0``, but a clip does not commute:
``relu6(x/s) ≠ relu6(x)/s``. Dropping the clip (replacing ReLU6 by ReLU, as other tools do)
changes the float network; keeping ReLU6 pairs out of CLE leaves MobileNetV2 and EfficientNet-Lite
(ReLU6 everywhere) unequalized. ptqkit scales the clip with the channel instead: the activation
node is re-pointed at a :class:`~ptqkit.graph.ChannelClamp` with per-channel bounds
``[lo/s_i, hi/s_i]`` (``max``/``min`` against constant vectors, exported to ONNX as Max/Min or
Relu/Min), so the function is exactly the same. Shared activation modules (EfficientNet's
``_swish``) are never modified: each equalized use gets its own clamp.

High-bias absorption. With the BatchNorm statistics recorded at folding time (``bn_mean`` β,
``bn_std`` |γ| of ``L1``'s output, scaled along with ``L1``), ``c_i = max(0, clamp(β_i - 3|γ_i|,
lo_i, hi_i))`` estimates the smallest value of the activation output. It is moved into ``L2``:
``b1 ← b1 - c``, ``b2 ← b2 + W2·c``, activation bounds ``[lo - c, hi - c]``. Because the clamp is
shifted too (``clamp(h, lo, hi) = clamp(h - c, lo - c, hi - c) + c``), this is exact for every
input, not only when the 3σ estimate holds; it is only applied where adding a constant to the
input of ``L2`` adds ``W2·c`` to every output position (checked numerically: Linear layers,
1×1 convs without padding; a zero-padded k×k conv would see ``c`` missing at the borders).
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn

from ..config import PTQConfig
from ..errors import ModelError
from ..graph import ChannelClamp, input_channel_view
from ..info import PTQInfo
from ..quant.modules import CONV_LAYERS, QuantLayer, quant_layers
from ..records import CLERecord
from ..typed import submodule
from .pairs import Pair, find_pairs

#: at most this many sweeps over all pairs
MAX_SWEEPS = 100
#: a sweep whose scales all lie within ``1 ± TOL`` ends the iteration
TOL = 1e-3
#: scales are clipped to ``[1/S_MAX, S_MAX]`` (dead channels and unused inputs get ``s = 1``)
S_MAX = 1e4


def _out_view(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def _shift_exact(layer: nn.Module) -> bool:
    """Whether adding a constant to every input position adds a constant to every output
    position (no padding, or no kernel footprint over it): tried on an all-ones input."""
    if isinstance(layer, nn.Linear):
        return True
    if not isinstance(layer, CONV_LAYERS):
        return False
    k, s, d = layer.kernel_size, layer.stride, layer.dilation
    size = [2 * (di * (ki - 1) + 1) + si for ki, si, di in zip(k, s, d)]
    x = torch.ones(
        1, layer.in_channels, *size, dtype=layer.weight.dtype, device=layer.weight.device
    )
    saved_w, saved_b = layer._buffers.get("weight"), layer.bias
    try:
        if saved_w is not None:
            layer._buffers["weight"] = torch.ones_like(saved_w)
        else:  # pragma: no cover - wrapped layers keep their weight as a buffer
            return False
        layer.bias = None
        with torch.no_grad():
            y = layer(x)
    except Exception:
        return False
    finally:
        layer._buffers["weight"] = saved_w
        layer.bias = saved_b
    flat = y.reshape(y.shape[0], y.shape[1], -1)
    return bool((flat.amax(-1) - flat.amin(-1)).abs().max() <= 1e-6 * flat.abs().max())


def _clamp_name(gm: fx.GraphModule, base: str) -> str:
    name = f"cle_clamp_{base.replace('.', '_')}"
    i = 0
    while hasattr(gm, name if i == 0 else f"{name}_{i}"):
        i += 1
    return name if i == 0 else f"{name}_{i}"


def _install_clamp(gm: fx.GraphModule, p: Pair) -> None:
    """Point ``p.act`` at a fresh :class:`ChannelClamp` with the pair's current bounds."""
    node = p.act
    if node is None:
        raise ModelError(f"CLE: no activation between {p.first} and {p.second} to clamp")
    inp = node.args[0]
    name = _clamp_name(gm, node.name)
    gm.add_submodule(name, ChannelClamp(p.lo, p.hi, p.axis))
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (inp,))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    p.act = new


def equalize(qmodel: nn.Module, info: PTQInfo, config: PTQConfig | None = None) -> nn.Module:
    """Cross-layer equalization + high-bias absorption of ``qmodel`` in place (see the module
    docstring). Records what it did in ``info.details["cle"]``; returns ``qmodel``.

    A pair with a layer a scope of ``config`` turns CLE off for (:meth:`PTQConfig.off_layers`)
    is left out (so that layer's weights stay as they are), with the scope in ``not_paired``
    and the layers in ``off_by_scope``."""
    if not isinstance(qmodel, fx.GraphModule):
        info.details["cle"] = {"pairs": [], "skipped": "the model could not be traced"}
        info.warn("CLE needs a traced graph to find layer pairs; the model was not traced: skipped")
        return qmodel
    pairs, why = find_pairs(qmodel)
    off = {} if config is None else config.off_layers("cle", quant_layers(qmodel))
    for p in pairs:
        hit = next((n for n in (p.first, p.second) if n in off), None)
        if hit is not None:
            why[p.first] = f"paired with {p.second}, but scope {off[hit]!r} turns CLE off for {hit}"
    pairs = [p for p in pairs if p.first not in off and p.second not in off]
    scoped: CLERecord = {"off_by_scope": off} if off else {}
    if not pairs:
        info.details["cle"] = {"pairs": [], "not_paired": why, **scoped}
        info.warn(
            "CLE found no equalizable layer pair (conv/linear → ReLU/ReLU6/identity → conv/linear "
            "with a single consumer); nothing was changed"
        )
        return qmodel
    all_layers = quant_layers(qmodel)
    layers = {n: all_layers[n] for p in pairs for n in (p.first, p.second)}
    w = {n: q.weight_fp.double().clone() for n, q in layers.items()}
    b: dict[str, torch.Tensor | None] = {
        n: (bias.detach().double().clone() if (bias := q.bias) is not None else None)
        for n, q in layers.items()
    }
    stats: dict[str, list[torch.Tensor]] = {}
    for n, q in layers.items():
        m, s = getattr(q.layer, "bn_mean", None), getattr(q.layer, "bn_std", None)
        if isinstance(m, torch.Tensor) and isinstance(s, torch.Tensor):
            stats[n] = [m.double().clone(), s.double().clone()]
    sweeps = _sweep(pairs, layers, w, b, stats)
    absorbed_pairs = _absorb(pairs, layers, w, b, stats)
    _write_back(layers, w, b, stats)
    clamps = _clamp_activations(qmodel, pairs)
    info.details["cle"] = {
        "pairs": [_record(p) for p in pairs],
        "sweeps": sweeps,
        "absorbed_pairs": absorbed_pairs,
        "clamps_installed": clamps,
        "not_paired": why,
        **scoped,
    }
    return qmodel


Weights = dict[str, torch.Tensor]
Biases = dict[str, torch.Tensor | None]
Stats = dict[str, list[torch.Tensor]]


def _sweep(
    pairs: list[Pair], layers: dict[str, QuantLayer], w: Weights, b: Biases, stats: Stats
) -> int:
    """The equalization sweeps over every pair (in float64, in place); returns how many ran."""
    sweeps = 0
    for sweeps in range(1, MAX_SWEEPS + 1):  # noqa: B007 - reported below
        worst = 0.0
        for p in pairs:
            l2 = layers[p.second].layer
            r1 = _out_view(w[p.first]).abs().amax(1)
            v2 = input_channel_view(l2, w[p.second], p.channels)
            assert v2 is not None  # find_pairs checked that the channels line up
            r2 = v2.abs().amax(dim=(1, 3)).reshape(-1)
            ok = (r1 > 0) & (r2 > 0)
            s = torch.where(ok, torch.sqrt(r1 * r2) / r2.clamp_min(1e-300), torch.ones_like(r1))
            s = s.clamp(1 / S_MAX, S_MAX)
            shape = [-1] + [1] * (w[p.first].dim() - 1)
            w[p.first] = w[p.first] / s.reshape(shape)
            if (b1 := b[p.first]) is not None:
                b[p.first] = b1 / s
            if p.first in stats:
                stats[p.first] = [t / s for t in stats[p.first]]
            g, _, cpg, _ = v2.shape
            w[p.second] = (v2 * s.reshape(g, 1, cpg, 1)).reshape(w[p.second].shape)
            p.lo, p.hi = p.lo / s, p.hi / s
            p.scale_total = p.scale_total * s
            worst = max(worst, float((s.log().abs()).max()))
        if worst < math.log1p(TOL):
            break
    return sweeps


def _absorb(
    pairs: list[Pair], layers: dict[str, QuantLayer], w: Weights, b: Biases, stats: Stats
) -> int:
    """High-bias absorption into each pair's second layer; returns how many pairs absorbed."""
    absorbed_pairs = 0
    for p in pairs:
        if p.first not in stats:
            p.notes.append("no BatchNorm statistics: no bias absorption")
            continue
        if not _shift_exact(layers[p.second].layer):
            p.notes.append(f"{p.second} pads its input: no bias absorption")
            continue
        mean, std = stats[p.first]
        est_min = torch.minimum(torch.maximum(mean - 3 * std, p.lo), p.hi)
        c = est_min.clamp_min(0.0)
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        if not bool((c > 0).any()):
            continue
        b1 = b[p.first]
        b[p.first] = (torch.zeros(p.channels, dtype=torch.float64) if b1 is None else b1) - c
        stats[p.first][0] = mean - c
        v2 = input_channel_view(layers[p.second].layer, w[p.second], p.channels)
        assert v2 is not None  # find_pairs checked that the channels line up
        g, _, cpg, _ = v2.shape
        add = (v2 * c.reshape(g, 1, cpg, 1)).sum(dim=(2, 3)).reshape(-1)
        b2 = b[p.second]
        b[p.second] = add if b2 is None else b2 + add
        p.lo, p.hi = p.lo - c, p.hi - c
        p.absorbed = float(c.abs().max())
        absorbed_pairs += 1
    return absorbed_pairs


def _write_back(layers: dict[str, QuantLayer], w: Weights, b: Biases, stats: Stats) -> None:
    """The equalized weights, biases and BatchNorm statistics into the layers, once."""
    for n, q in layers.items():
        q.set_float_weight(w[n].float())
        if (bn := b[n]) is not None:
            q.layer.bias = nn.Parameter(bn.float().to(q.weight_fp.device), requires_grad=False)
        if n in stats:
            q.layer.bn_mean = stats[n][0].float().to(q.weight_fp.device)
            q.layer.bn_std = stats[n][1].float().to(q.weight_fp.device)


def _clamp_activations(qmodel: fx.GraphModule, pairs: list[Pair]) -> int:
    """Scale each changed clipping activation with its channels; returns how many changed."""
    clamps = 0
    for p in pairs:
        if p.act is None:
            continue
        m = submodule(qmodel, p.act) if p.act.op == "call_module" else None
        if torch.equal(p.lo, p.lo0) and torch.equal(p.hi, p.hi0):
            continue  # a ReLU stays a ReLU (0 and inf scale to themselves)
        if isinstance(m, ChannelClamp) and len(p.act.users) == 1 and _private(qmodel, p.act):
            m.lo, m.hi = p.lo.float(), p.hi.float()
            m._flags()
        else:
            _install_clamp(qmodel, p)
        clamps += 1
    qmodel.graph.lint()
    qmodel.delete_all_unused_submodules()
    qmodel.recompile()
    return clamps


def _record(p: Pair) -> dict[str, object]:
    return {
        "first": p.first,
        "second": p.second,
        "activation": p.act_kind,
        "scale_min": float(p.scale_total.min()),
        "scale_max": float(p.scale_total.max()),
        "absorbed_max": p.absorbed,
        **({"notes": p.notes} if p.notes else {}),
    }


def _private(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether no other node calls the same module as ``node``."""
    return sum(n.op == "call_module" and n.target == node.target for n in gm.graph.nodes) == 1


__all__ = ["ChannelClamp", "equalize", "find_pairs"]
