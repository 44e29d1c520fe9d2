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
node is re-pointed at a :class:`ChannelClamp` with per-channel bounds ``[lo/s_i, hi/s_i]``
(``max``/``min`` against constant vectors, exported to ONNX as Max/Min or Relu/Min), so the
function is exactly the same. Shared activation modules (EfficientNet's ``_swish``) are never
modified: each equalized use gets its own clamp.

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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..info import PTQInfo
from ..quant.modules import ActQuant, QuantLayer

#: at most this many sweeps over all pairs
MAX_SWEEPS = 100
#: a sweep whose scales all lie within ``1 ± TOL`` ends the iteration
TOL = 1e-3
#: scales are clipped to ``[1/S_MAX, S_MAX]`` (dead channels and unused inputs get ``s = 1``)
S_MAX = 1e4


class ChannelClamp(nn.Module):
    """``y = min(max(x, lo_c), hi_c)`` with per-channel bounds along ``axis`` (``±inf`` allowed).

    What a ReLU / ReLU6 / Hardtanh becomes once CLE has scaled (and bias absorption shifted) its
    input channels. A lower bound of exactly 0 everywhere runs as ``relu``.
    """

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, axis: int = 1) -> None:
        super().__init__()
        self.axis = axis
        self.register_buffer("lo", lo.detach().float().clone())
        self.register_buffer("hi", hi.detach().float().clone())
        self._flags()

    def _flags(self) -> None:
        self.relu = bool((self.lo == 0).all())
        self.has_lo = bool(torch.isfinite(self.lo).any())
        self.has_hi = bool(torch.isfinite(self.hi).any())

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._flags()

    def extra_repr(self) -> str:
        return f"channels={self.lo.numel()}, axis={self.axis}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.axis] = -1
        if self.relu:
            x = torch.relu(x)
        elif self.has_lo:
            x = torch.maximum(x, self.lo.to(x.dtype).reshape(shape))
        if self.has_hi:
            x = torch.minimum(x, self.hi.to(x.dtype).reshape(shape))
        return x


# -- the ops a pair may have between its two layers ------------------------------------------------
_TRANSPARENT = (ActQuant, nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_TRANSPARENT_FN = {F.dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d, "contiguous"}
_POOL_TO_ONE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_INF = math.inf


def _arg(node: fx.Node, i: int, name: str, default: object) -> object:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _activation_bounds(node: fx.Node, gm: fx.GraphModule) -> tuple | None:
    """``(lo, hi)`` of a clipping activation node (floats, or tensors for a ChannelClamp)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, ChannelClamp):
            return m.lo.double(), m.hi.double()
        if isinstance(m, nn.ReLU):
            return 0.0, _INF
        if isinstance(m, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
            return float(m.min_val), float(m.max_val)
        return None
    t = node.target
    if t in (F.relu, torch.relu, "relu"):
        return 0.0, _INF
    if t is F.relu6:
        return 0.0, 6.0
    if t is F.hardtanh:
        lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
    elif t in (torch.clamp, torch.clip, "clamp", "clip"):
        lo, hi = _arg(node, 1, "min", None), _arg(node, 2, "max", None)
        lo = -_INF if lo is None else lo
        hi = _INF if hi is None else hi
    else:
        return None
    if not all(isinstance(v, (int, float)) for v in (lo, hi)):
        return None
    return float(lo), float(hi)


def _is_flatten_1(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if node.target in (torch.flatten, "flatten"):
        return _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1
    return False


def _transparent(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` commutes with a positive per-channel scale and a per-channel shift
    (activation quantizers are still off while CLE runs)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (*_TRANSPARENT, *_POOL_TO_ONE))
    return node.op in ("call_function", "call_method") and node.target in _TRANSPARENT_FN


@dataclass
class _Pair:
    first: str
    second: str
    channels: int
    axis: int  # channel axis of the tensor between them (1 for convs, -1 for Linear)
    act: fx.Node | None = None
    act_kind: str = "identity"
    lo: torch.Tensor | None = None  # current activation bounds per channel (float64)
    hi: torch.Tensor | None = None
    lo0: torch.Tensor | None = None  # the bounds before CLE
    hi0: torch.Tensor | None = None
    scale_total: torch.Tensor | None = None
    absorbed: float = 0.0
    notes: list[str] = field(default_factory=list)


def _walk(node: fx.Node, gm: fx.GraphModule, calls: dict[str, int]) -> tuple | str:
    """From the output of a wrapped layer to the next wrapped layer: ``(second node, activation
    node, bounds, flattened)``, or a reason string when the chain does not qualify."""
    cur, act, bounds, flat = node, None, None, False
    while True:
        if len(cur.users) != 1:
            return (
                "its output has several users" if cur is node else f"{cur.name} has several users"
            )
        u = next(iter(cur.users))
        if u.op == "call_module" and isinstance(gm.get_submodule(u.target), QuantLayer):
            if not u.args or u.args[0] is not cur or calls.get(u.target, 0) != 1:
                return f"{u.target} is called more than once or on another input"
            return u, act, bounds, flat
        b = _activation_bounds(u, gm)
        if b is not None:
            if act is not None:
                return "two activations in a row"
            if flat:
                return "an activation after flatten"
            act, bounds = u, b
        elif _is_flatten_1(u, gm):
            flat = True
        elif not _transparent(u, gm):
            return f"{u.name} ({u.op} {getattr(u.target, '__name__', u.target)}) is in between"
        cur = u


def _out_view(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def _in_view(layer: nn.Module, w: torch.Tensor, channels: int) -> torch.Tensor | None:
    """``w`` as ``[groups, out per group, in channels per group, rest]``, so that input channel
    ``g·cpg + j`` is ``[g, :, j, :]``; ``None`` when the channels do not line up."""
    if isinstance(layer, nn.Linear):
        if w.shape[1] % channels:
            return None
        return w.reshape(1, w.shape[0], channels, -1)
    g = layer.groups
    cpg = w.shape[1]
    if g * cpg != channels:
        return None
    return w.reshape(g, w.shape[0] // g, cpg, -1)


def _shift_exact(layer: nn.Module) -> bool:
    """Whether adding a constant to every input position adds a constant to every output
    position (no padding, or no kernel footprint over it): tried on an all-ones input."""
    if isinstance(layer, nn.Linear):
        return True
    k, s, d = layer.kernel_size, layer.stride, layer.dilation
    size = [2 * (di * (ki - 1) + 1) + si for ki, si, di in zip(k, s, d)]
    x = torch.ones(
        1, layer.in_channels, *size, dtype=layer.weight.dtype, device=layer.weight.device
    )
    saved_w, saved_b = layer._buffers.get("weight"), layer.bias
    try:
        if "weight" in layer._buffers:
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


def _as_vec(v: object, n: int) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.double().clone()
    return torch.full((n,), float(v), dtype=torch.float64)


def find_pairs(gm: fx.GraphModule) -> tuple[list[_Pair], dict[str, str]]:
    """The equalizable pairs of ``gm`` in graph order, and why other layers are not in one."""
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    pairs, why = [], {}
    for n in gm.graph.nodes:
        if n.op != "call_module" or not isinstance(gm.get_submodule(n.target), QuantLayer):
            continue
        if calls[n.target] != 1:
            why[n.target] = "called more than once"
            continue
        got = _walk(n, gm, calls)
        if isinstance(got, str):
            why[n.target] = got
            continue
        second, act, bounds, flat = got
        l1 = gm.get_submodule(n.target).layer
        l2 = gm.get_submodule(second.target).layer
        c = l1.weight.shape[0]
        if isinstance(l1, nn.Linear) and not isinstance(l2, nn.Linear):
            why[n.target] = "Linear followed by a conv"
            continue
        if flat != (isinstance(l2, nn.Linear) and not isinstance(l1, nn.Linear)):
            why[n.target] = "conv into Linear without flatten(x, 1), or flatten between Linears"
            continue
        if _in_view(l2, l2.weight, c) is None:
            why[n.target] = f"its {c} output channels do not line up with {second.target}'s input"
            continue
        axis = -1 if isinstance(l1, nn.Linear) else 1
        lo, hi = bounds if bounds is not None else (-_INF, _INF)
        lo, hi = _as_vec(lo, c), _as_vec(hi, c)
        pairs.append(
            _Pair(
                first=n.target,
                second=second.target,
                channels=c,
                axis=axis,
                act=act,
                act_kind=_act_name(act),
                lo=lo,
                hi=hi,
                lo0=lo.clone(),
                hi0=hi.clone(),
                scale_total=torch.ones(c, dtype=torch.float64),
            )
        )
    return pairs, why


def _clamp_name(gm: fx.GraphModule, base: str) -> str:
    name = f"cle_clamp_{base.replace('.', '_')}"
    i = 0
    while hasattr(gm, name if i == 0 else f"{name}_{i}"):
        i += 1
    return name if i == 0 else f"{name}_{i}"


def _install_clamp(gm: fx.GraphModule, p: _Pair) -> None:
    """Point ``p.act`` at a fresh :class:`ChannelClamp` with the pair's current bounds."""
    node = p.act
    inp = node.args[0]
    name = _clamp_name(gm, node.name)
    gm.add_submodule(name, ChannelClamp(p.lo, p.hi, p.axis))
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (inp,))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    p.act = new


def equalize(qmodel: nn.Module, info: PTQInfo) -> nn.Module:
    """Cross-layer equalization + high-bias absorption of ``qmodel`` in place (see the module
    docstring). Records what it did in ``info.details["cle"]``; returns ``qmodel``."""
    if not isinstance(qmodel, fx.GraphModule):
        info.details["cle"] = {"pairs": [], "skipped": "the model could not be traced"}
        info.warn("CLE needs a traced graph to find layer pairs; the model was not traced: skipped")
        return qmodel
    pairs, why = find_pairs(qmodel)
    if not pairs:
        info.details["cle"] = {"pairs": [], "not_paired": why}
        info.warn(
            "CLE found no equalizable layer pair (conv/linear → ReLU/ReLU6/identity → conv/linear "
            "with a single consumer); nothing was changed"
        )
        return qmodel

    layers = {n: qmodel.get_submodule(n) for p in pairs for n in (p.first, p.second)}
    w = {n: q.weight_fp.double().clone() for n, q in layers.items()}
    b = {
        n: (q.bias.detach().double().clone() if q.bias is not None else None)
        for n, q in layers.items()
    }
    stats = {}
    for n, q in layers.items():
        m, s = getattr(q.layer, "bn_mean", None), getattr(q.layer, "bn_std", None)
        if isinstance(m, torch.Tensor) and isinstance(s, torch.Tensor):
            stats[n] = [m.double().clone(), s.double().clone()]

    # -- equalization sweeps ----------------------------------------------------------------
    sweeps = 0
    for sweeps in range(1, MAX_SWEEPS + 1):  # noqa: B007 - reported below
        worst = 0.0
        for p in pairs:
            l2 = layers[p.second].layer
            r1 = _out_view(w[p.first]).abs().amax(1)
            v2 = _in_view(l2, w[p.second], p.channels)
            r2 = v2.abs().amax(dim=(1, 3)).reshape(-1)
            ok = (r1 > 0) & (r2 > 0)
            s = torch.where(ok, torch.sqrt(r1 * r2) / r2.clamp_min(1e-300), torch.ones_like(r1))
            s = s.clamp(1 / S_MAX, S_MAX)
            shape = [-1] + [1] * (w[p.first].dim() - 1)
            w[p.first] = w[p.first] / s.reshape(shape)
            if b[p.first] is not None:
                b[p.first] = b[p.first] / s
            if p.first in stats:
                stats[p.first] = [t / s for t in stats[p.first]]
            g, _, cpg, _ = v2.shape
            w[p.second] = (v2 * s.reshape(g, 1, cpg, 1)).reshape(w[p.second].shape)
            p.lo, p.hi = p.lo / s, p.hi / s
            p.scale_total = p.scale_total * s
            worst = max(worst, float((s.log().abs()).max()))
        if worst < math.log1p(TOL):
            break

    # -- high-bias absorption ------------------------------------------------------------------
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
        if b[p.first] is None:
            b[p.first] = torch.zeros(p.channels, dtype=torch.float64)
        b[p.first] = b[p.first] - c
        stats[p.first][0] = mean - c
        v2 = _in_view(layers[p.second].layer, w[p.second], p.channels)
        g, _, cpg, _ = v2.shape
        add = (v2 * c.reshape(g, 1, cpg, 1)).sum(dim=(2, 3)).reshape(-1)
        b[p.second] = add if b[p.second] is None else b[p.second] + add
        p.lo, p.hi = p.lo - c, p.hi - c
        p.absorbed = float(c.abs().max())
        absorbed_pairs += 1

    # -- write back once ---------------------------------------------------------------------
    for n, q in layers.items():
        q.set_float_weight(w[n].float())
        if b[n] is not None:
            q.layer.bias = nn.Parameter(b[n].float().to(q.weight_fp.device), requires_grad=False)
        if n in stats:
            q.layer.bn_mean = stats[n][0].float().to(q.weight_fp.device)
            q.layer.bn_std = stats[n][1].float().to(q.weight_fp.device)
    clamps = 0
    for p in pairs:
        if p.act is None:
            continue
        m = qmodel.get_submodule(p.act.target) if p.act.op == "call_module" else None
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

    info.details["cle"] = {
        "pairs": [
            {
                "first": p.first,
                "second": p.second,
                "activation": p.act_kind,
                "scale_min": float(p.scale_total.min()),
                "scale_max": float(p.scale_total.max()),
                "absorbed_max": p.absorbed,
                **({"notes": p.notes} if p.notes else {}),
            }
            for p in pairs
        ],
        "sweeps": sweeps,
        "absorbed_pairs": absorbed_pairs,
        "clamps_installed": clamps,
        "not_paired": why,
    }
    return qmodel


def _private(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether no other node calls the same module as ``node``."""
    return sum(n.op == "call_module" and n.target == node.target for n in gm.graph.nodes) == 1


def _act_name(node: fx.Node | None) -> str:
    if node is None:
        return "identity"
    t = node.target
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(t)).__name__
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


__all__ = ["ChannelClamp", "equalize", "find_pairs"]
