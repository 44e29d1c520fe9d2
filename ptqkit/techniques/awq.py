"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", arXiv:2306.00978): scale up the weight channels that meet large activations
before rounding, so that they lose less to it.

For the quantized Linears that read one tensor ``X`` (a normalization's output: q/k/v, or the
first MLP layer), per input channel ``j``:

    ``s_j = mean|X_j|^α``, normalized by ``sqrt(max s · min s)``;  ``W' = W·diag(s)``,
    ``X' = X·diag(1/s)``

so ``X'·W'ᵀ = X·Wᵀ``: the float function is unchanged. ``α`` is searched on a grid
``{0, 1/n, …, (n-1)/n}`` (``AWQOptions.grid``, the paper's 20) to minimize, on cached rows of
``X``, ``Σ_layers ||X·(Q(W·diag(s))·diag(1/s))ᵀ − X·Wᵀ||²`` with ``Q`` each layer's own weight
quantizer (its spec: bits, per channel or group-wise; min-max ranges). ``α = 0`` is plain
nearest rounding, so the chosen scales are never worse than it on those rows.

``1/s`` goes where SmoothQuant puts it (:mod:`ptqkit.equalize.smoothquant`): folded into the
normalization's ``γ, β`` when its output feeds only those Linears (pre-LN transformers; exact,
free at run time), else into each layer's static input quantizer (a multiply before it,
``SmoothedActQuant``). A group with neither (weights only or dynamic activations, post-LN) is
left as it is and recorded. Which layers read one normalization output is read from the graph,
or, for a model captured with hooks, seen by tensor identity during the pass. One pass over the
calibration data of its own (before the calibration pass: it changes the activations),
``num_batches`` batches; not with SmoothQuant (both put scales there).

Not here: AWQ's weight-clipping search, scales folded into a preceding Linear (v → o).
Turned on with ``PTQConfig(techniques={"awq": AWQOptions()})``; composes with GPTQ.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Final

import torch
from torch import fx, nn

from ..config import PTQConfig, QuantSpec
from ..errors import ConfigError
from ..records import AWQRecord
from ..stage import Context
from ..technique import Candidate, Technique, register
from .awq_tune import awq_gptq, awq_rtn, estimate_seconds, not_applicable, with_gptq_not_applicable

NAME: Final = "awq"


@dataclass(frozen=True)
class AWQOptions:
    """AWQ's settings: ``grid`` values of ``α`` tried (the paper's 20) on at most ``rows``
    cached input rows per group of layers (taken evenly from every batch)."""

    grid: int = 20
    rows: int = 2048

    def __post_init__(self) -> None:
        for name in ("grid", "rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"AWQOptions.{name} must be a positive int, got {v!r}")


def _rounded(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``Q(w)``: nearest rounding on min-max ranges with ``spec`` (per tensor, per channel or
    group-wise), back in float."""
    from ..calibrate.weights import group_range
    from ..quant.primitives import fake_quant, qparams

    if spec.group_size is not None:
        lo, hi = group_range(w, spec, "minmax")
    elif spec.per_channel:
        lo, hi = w.amin(dim=1), w.amax(dim=1)
    else:
        lo, hi = w.min(), w.max()
    scale, zp = qparams(lo, hi, spec)
    return fake_quant(w, scale, zp, spec)


def search_scale(
    x: torch.Tensor, layers: list[Any], grid: int
) -> tuple[torch.Tensor, float, float, float]:
    """The AWQ scale ``s`` for the layers reading rows ``x`` (``[rows, C_in]``): the grid's best
    ``α``, with the output error at that ``α`` and at ``α = 0`` (nearest rounding)."""
    x = x.float()
    mean_abs = x.abs().mean(dim=0).clamp_min(1e-8)
    refs = [x @ layer.weight_fp.float().t() for layer in layers]
    best: tuple[float, float, torch.Tensor] | None = None
    plain = float("nan")
    for k in range(grid):
        alpha = k / grid
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for layer, ref in zip(layers, refs):
            w = layer.weight_fp.float()
            wq = _rounded(w * s, layer.spec) / s
            err += float((x @ wq.t() - ref).pow(2).sum())
        if k == 0:
            plain = err
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None
    return best[2], best[1], best[0], plain


def _input_of(node: fx.Node, gm: fx.GraphModule) -> Any:
    """The tensor a layer reads, looking through its input quantizer."""
    from ..quant.modules import ActQuant
    from ..typed import submodule

    x = node.args[0] if node.args else None
    if isinstance(x, fx.Node) and x.op == "call_module" and isinstance(submodule(gm, x), ActQuant):
        return x.args[0] if x.args else None
    return x


def groups(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """Quantized Linears by the normalization output they read (module or function)."""
    from ..equalize.smoothquant import NORM_FUNCTIONS, NORMS
    from ..quant.modules import quant_layers
    from ..typed import submodule

    linears = {n for n, m in quant_layers(gm).items() if isinstance(m.layer, nn.Linear)}
    out: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in linears:
            continue
        src = _input_of(node, gm)
        if isinstance(src, fx.Node) and (
            (src.op == "call_module" and isinstance(submodule(gm, src), NORMS))
            or (src.op == "call_function" and src.target in NORM_FUNCTIONS)
        ):
            out.setdefault(src, []).append(node)
    return out


def _run_pass(ctx: Context, handles: list[Any]) -> None:
    """One pass over the calibration data (``num_batches``) with ``handles`` (hooks) attached,
    removed at the end."""
    from ..data import iter_batches, model_device, run_model, to_device

    device = model_device(ctx.qmodel)
    try:
        with torch.no_grad():
            for i, (args, kwargs) in iter_batches(ctx.data, ctx.config.num_batches):
                args, kwargs = to_device(args, kwargs, device)
                run_model(ctx.qmodel, i, args, kwargs)
    finally:
        for h in handles:
            h.remove()


def _rows_of(x: torch.Tensor, rows: int) -> torch.Tensor:
    """At most ``rows`` rows of ``x.reshape(-1, C)``, evenly spaced, float32 on the CPU."""
    x = x.detach().reshape(-1, x.shape[-1])
    if x.shape[0] > rows:
        x = x[torch.linspace(0, x.shape[0] - 1, rows, device=x.device).long()]
    return x.float().cpu()


def _collect(ctx: Context, first: dict[str, nn.Module], rows: int) -> dict[str, torch.Tensor]:
    """One pass over the data: up to ``rows`` input rows of each group's first layer, taken
    evenly from every batch."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in first}

    def hook(_mod: nn.Module, args: tuple, name: str = "") -> None:
        seen[name].append(_rows_of(args[0], rows))

    _run_pass(
        ctx,
        [m.register_forward_pre_hook(functools.partial(hook, name=n)) for n, m in first.items()],
    )
    return {n: _rows_of(torch.cat(p), rows) if p else torch.zeros(0) for n, p in seen.items()}


def _collect_hooked(ctx: Context, rows: int) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """Without a graph: the quantized Linears whose input is the very tensor a normalization
    module returned (seen by identity, as SmoothQuant does), by that module, with up to ``rows``
    rows of that tensor."""
    from ..equalize.smoothquant import NORMS
    from ..quant.modules import quant_layers

    outs: dict[str, torch.Tensor] = {}  # this batch's normalization outputs
    taken: set[str] = set()
    members: dict[str, list[str]] = {}
    seen: dict[str, list[torch.Tensor]] = {}

    def on_model(_mod: nn.Module, _args: tuple) -> None:
        outs.clear()
        taken.clear()

    def on_norm(_mod: nn.Module, _args: tuple, out: Any, name: str = "") -> None:
        outs[name] = out

    def on_layer(_mod: nn.Module, args: tuple, name: str = "") -> None:
        src = next((k for k, t in outs.items() if args[0] is t), None)
        if src is None:
            return
        if name not in members.setdefault(src, []):
            members[src].append(name)
        if src not in taken:
            taken.add(src)
            seen.setdefault(src, []).append(_rows_of(args[0], rows))

    model = ctx.qmodel
    handles = [model.register_forward_pre_hook(on_model)]
    handles += [
        m.register_forward_hook(functools.partial(on_norm, name=n))
        for n, m in model.named_modules()
        if isinstance(m, NORMS)
    ]
    handles += [
        m.register_forward_pre_hook(functools.partial(on_layer, name=n))
        for n, m in quant_layers(model).items()
        if isinstance(m.layer, nn.Linear)
    ]
    try:
        _run_pass(ctx, handles)
    finally:
        outs.clear()
    return {k: (_rows_of(torch.cat(seen[k]), rows), v) for k, v in members.items()}


def _apply_hooked(model: nn.Module, names: list[str], s: torch.Tensor) -> str:
    """Without a graph, ``1/s`` can only go into each layer's own static input quantizer."""
    from ..equalize.smoothquant import SmoothedActQuant
    from ..quant.modules import QuantLayer

    layers: list[QuantLayer] = []
    for n in names:
        layer = model.get_submodule(n)
        assert isinstance(layer, QuantLayer)  # _collect_hooked hooks quantized layers only
        iq = layer.input_quant
        if iq is None or iq.spec.dynamic:
            return "not scaled: no static input quantizer inside the layer can hold 1/s"
        layers.append(layer)
    for layer in layers:
        old = layer.input_quant
        assert old is not None
        layer.set_float_weight(layer.weight_fp * s.to(layer.weight_fp.device))
        layer.input_quant = SmoothedActQuant(old.spec, f"{old.label} (AWQ)", 1.0 / s)
    return "explicit scale before the input quantizer"


def _holds_inverse(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``1/s`` can go before the layer: a static input quantizer in the graph (a layer's
    own dynamic quantizer is part of its integer matmul and cannot hold it yet)."""
    from ..quant.modules import ActQuant
    from ..typed import submodule

    x = node.args[0] if node.args else None
    return (
        isinstance(x, fx.Node) and x.op == "call_module" and isinstance(submodule(gm, x), ActQuant)
    )


def _apply(gm: fx.GraphModule, src: fx.Node, nodes: list[fx.Node], s: torch.Tensor) -> str:
    """Scale the layers' weights by ``s`` and put ``1/s`` before them; how, or why not."""
    from ..equalize.smoothquant import explicit_in_graph, foldable_norm
    from ..quant.modules import QuantLayer
    from ..typed import optional_tensor_attr, submodule, tensor_attr

    norm = foldable_norm(src, nodes, gm)
    if norm is None and not all(_holds_inverse(gm, n) for n in nodes):
        return (
            "not scaled: the normalization's output is read elsewhere and no input quantizer "
            "can hold 1/s"
        )
    for n in nodes:
        layer = submodule(gm, n)
        assert isinstance(layer, QuantLayer)  # groups() keeps quantized layers only
        layer.set_float_weight(layer.weight_fp * s.to(layer.weight_fp.device))
    if norm is not None:
        gamma, beta = tensor_attr(norm, "weight"), optional_tensor_attr(norm, "bias")
        with torch.no_grad():
            gamma.div_(s.to(gamma.device))
            if beta is not None:
                beta.div_(s.to(beta.device))
        return f"folded into {src.target}"
    for n in nodes:
        explicit_in_graph(gm, n, 1.0 / s)
    return "explicit scale before the input quantizer"


def _record(details: AWQRecord, names: list[str], found: tuple, how: str) -> None:
    _s, alpha, err, plain = found
    for n in names:
        details["layers"][n] = {"alpha": alpha, "error": err, "error_nearest": plain, "how": how}


def awq(ctx: Context) -> None:
    """Apply AWQ to every group of quantized Linears reading one normalization output (less
    the layers a scope turns AWQ off for, :meth:`PTQConfig.off_layers`: their weights and input
    stay as they are)."""
    from ..capture.verify import verify_stage
    from ..quant.modules import act_quants, quant_layers
    from ..sync import active
    from ..typed import submodule

    opts = TECHNIQUE.options_in(ctx.config)
    info, gm = ctx.info, ctx.qmodel
    details: AWQRecord = {"grid": opts.grid, "layers": {}}
    info.details[NAME] = details
    if active():
        raise ConfigError("AWQ under torch.distributed is not supported yet; leave it off there")
    if ctx.config.smoothquant is not None:
        raise ConfigError(
            "AWQ and SmoothQuant both move per-channel scales into the layers' inputs; turn one "
            "off (PTQConfig.smoothquant=None, or techniques without 'awq')"
        )
    off = ctx.config.off_layers(NAME, quant_layers(gm))  # a scope's: left out of their group
    if off:  # (a normalization an off layer reads is not folded into: explicit scales instead)
        details["off_by_scope"] = off
    if not isinstance(gm, fx.GraphModule):
        for x, members in _collect_hooked(ctx, opts.rows).values():
            names = [n for n in members if n not in off]
            if not names:
                continue
            layers = [gm.get_submodule(n) for n in names]
            found = search_scale(x, layers, opts.grid)
            _record(details, names, found, _apply_hooked(gm, names, found[0]))
    else:
        groups_ = {
            src: kept
            for src, nodes in groups(gm).items()
            if (kept := [n for n in nodes if str(n.target) not in off])
        }
        first = {str(nodes[0].target): submodule(gm, nodes[0]) for nodes in groups_.values()}
        cached = _collect(ctx, first, opts.rows) if first else {}
        for src, nodes in groups_.items():
            x = cached[str(nodes[0].target)]
            if x.shape[0]:
                found = search_scale(x, [submodule(gm, n) for n in nodes], opts.grid)
                _record(
                    details, [str(n.target) for n in nodes], found, _apply(gm, src, nodes, found[0])
                )
        gm.graph.lint()
        gm.recompile()
    if not details["layers"]:
        info.warn("AWQ: no quantized nn.Linear reads a LayerNorm/RMSNorm output; nothing scaled")
        return
    info.quantizers = {n: q.label for n, q in act_quants(gm).items()}
    verify_stage(gm, ctx.ref, "AWQ", info)


def _enabled(config: PTQConfig) -> bool:
    return NAME in config.techniques and config.techniques[NAME] is not False


TECHNIQUE = register(
    Technique(
        NAME,
        310,  # after SmoothQuant (300), before the calibration pass (400)
        awq,
        enabled=_enabled,
        again=lambda c: True,
        phase="prefix",
        fields=("techniques",),
        options=AWQOptions,
        cost_key=lambda c: NAME,
        prior_passes={NAME: 2.0},
        estimate=estimate_seconds,  # its tune side: ptqkit.techniques.awq_tune
        candidates=(
            Candidate("AWQ", rank=46, applies=not_applicable, changes_for=awq_rtn),
            Candidate(
                "AWQ + GPTQ", rank=47, applies=with_gptq_not_applicable, changes_for=awq_gptq
            ),
        ),
        reference="Lin et al. 2023, arXiv:2306.00978",
        per_layer=True,
    )
)

__all__ = ["TECHNIQUE", "AWQOptions", "awq", "groups", "search_scale"]
