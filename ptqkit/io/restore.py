"""Filling a freshly prepared model with a file's tensors, each one validated first.

A loaded model computes only with values that pass the checks a quantization parameter must
pass (:func:`check_qparams`): scale finite and ``> 0``, zero point an integer inside the grid
``[qmin, qmax]`` of its spec, integer weights inside that grid and in their storage dtype, and
every shape the one the architecture sets (per-channel scales: one per output channel). The
float reference (the float weight after BN folding / CLE / SmoothQuant, and with bias correction
the float bias ``bias_fp`` beside the corrected ``bias_q``) is restored too, so that
:func:`~ptqkit.quant.modules.float_mode` on a loaded model is the float network that was
quantized. A failure is a :class:`~ptqkit.LoadError` naming the entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..config import QuantSpec
from ..errors import LoadError
from ..quant.modules import ActQuant, QuantLayer
from ..quant.primitives import storage_dtype, weight_qparam_shape
from ..typed import submodule, target_name, tensor_attr

#: prefixes of the float-reference tensors (not in the state dict): the float weight of every
#: layer, and the float / corrected biases of layers that bias correction changed
FLOAT_WEIGHT, BIAS_FP, BIAS_Q = "__float_weight__.", "__bias_fp__.", "__bias_q__."
PREFIXES = (FLOAT_WEIGHT, BIAS_FP, BIAS_Q)


def float_reference(layers: dict[str, QuantLayer]) -> dict[str, torch.Tensor]:
    """The tensors :func:`restore_layers` needs to rebuild each layer's float reference."""
    out = {}
    for name, layer in layers.items():
        out[FLOAT_WEIGHT + name] = layer.weight_fp.detach().cpu()
        if isinstance(getattr(layer, "bias_q", None), torch.Tensor):
            out[BIAS_FP + name] = tensor_attr(layer, "bias_fp").detach().cpu()
            out[BIAS_Q + name] = tensor_attr(layer, "bias_q").detach().cpu()
    return out


def is_flags(key: str) -> bool:
    """A module's ``ptq_flags`` entry (:mod:`ptqkit.quant.state`): its state, which the file's
    metadata also holds."""
    return key.rsplit(".", 1)[-1] == "ptq_flags"


def _bad(path: Path, entry: str, what: str) -> LoadError:
    return LoadError(f"{path}: {entry}: {what} (an edited or corrupt file)")


def check_shape(path: Path, key: str, got: torch.Tensor, want: tuple[int, ...]) -> None:
    if tuple(got.shape) != tuple(want):
        raise LoadError(
            f"{path}: the model does not match the file: {key} has shape {tuple(got.shape)} in "
            f"the file but {tuple(want)} in the model"
        )


def check_qparams(
    path: Path, entry: str, scale: torch.Tensor, zp: torch.Tensor, spec: QuantSpec
) -> None:
    """Scale finite and > 0, zero point an integer inside the grid of ``spec``."""
    if not torch.is_floating_point(scale):
        raise _bad(path, entry, f"scale is {scale.dtype}, not a float")
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bad.any():
        v = scale.reshape(-1)[bad.reshape(-1)][0].item()
        raise _bad(path, entry, f"scale {v} is not finite and > 0")
    if torch.is_floating_point(zp) or zp.is_complex() or zp.dtype == torch.bool:
        raise _bad(path, entry, f"zero point is {zp.dtype}, not an integer")
    _in_grid(path, entry, "zero point", zp, spec)


def _in_grid(path: Path, entry: str, what: str, t: torch.Tensor, spec: QuantSpec) -> None:
    if t.numel() and (int(t.min()) < spec.qmin or int(t.max()) > spec.qmax):
        v = int(t.min()) if int(t.min()) < spec.qmin else int(t.max())
        raise _bad(
            path,
            entry,
            f"{what} {v} outside the grid [{spec.qmin}, {spec.qmax}] of its "
            f"{spec.bits}-bit {'symmetric' if spec.symmetric else 'asymmetric'} spec",
        )


def _float_tensor(path: Path, key: str, t: torch.Tensor | None, want: tuple[int, ...]) -> Any:
    if t is None:
        raise LoadError(f"{path}: the file lacks {key} (the float reference)")
    if not torch.is_floating_point(t):
        raise _bad(path, key, f"is {t.dtype}, not a float")
    check_shape(path, key, t, want)
    return t


def restore_layers(
    path: Path,
    layers: dict[str, QuantLayer],
    layer_meta: dict[str, dict[str, Any]],
    state: dict[str, torch.Tensor],
    extra: dict[str, torch.Tensor],
) -> None:
    """Integer weights, scales and zero points of each layer (replaced, not copied into: their
    shapes are set by quantization), its float reference, then the layer computes with
    ``(q - z)·s`` (or its float weight, for a layer kept in float)."""
    for name, layer in layers.items():
        m = layer_meta[name]
        spec = layer.spec = QuantSpec.from_dict(m["spec"])
        w_shape = tuple(layer.weight_fp.shape)
        q = state.pop(f"{name}.weight_int")
        s = state.pop(f"{name}.weight_scale")
        z = state.pop(f"{name}.weight_zero_point")
        if q.numel():
            check_shape(path, f"{name}.weight_int", q, w_shape)
            if q.dtype != storage_dtype(spec):
                raise LoadError(
                    f"{path}: {name}.weight_int is {q.dtype}, expected "
                    f"{storage_dtype(spec)} for {spec.bits}-bit weights"
                )
            _in_grid(path, f"{name}.weight_int", "integer weight", q, spec)
            want = weight_qparam_shape(w_shape, spec)  # () / (C,) / (out, groups)
            check_shape(path, f"{name}.weight_scale", s, want)
            check_shape(path, f"{name}.weight_zero_point", z, want)
            check_qparams(path, f"{name}.weight_scale/zero_point", s, z, spec)
        dev = layer.weight_fp.device
        w = _float_tensor(path, FLOAT_WEIGHT + name, extra.pop(FLOAT_WEIGHT + name, None), w_shape)
        layer.weight_fp = w.to(dev)  # in the saved model's dtype (see match_dtypes)
        layer.weight_int = q.to(dev)
        layer.weight_scale = s.to(dev)
        layer.weight_zero_point = z.to(dev)
        if m["quantized"]:
            if not q.numel():
                raise LoadError(f"{path}: layer {name} is marked quantized but has no weights")
            layer.refresh()
        else:
            layer.use_float()  # with ``bias_fp`` (install_biases ran first)


def match_dtypes(qmodel: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every floating parameter and buffer of ``qmodel`` the dtype its entry in ``state``
    has, before ``load_state_dict`` copies the values (which would cast them to the
    architecture's dtype). The loaded model has the saved model's dtypes tensor by tensor: a
    ``.half()`` / ``.double()`` / bfloat16 model loads as one, whatever the dtype of the float
    architecture it is loaded onto, and computes what it computed (a float32 architecture
    under half float weights and biases would fail on the first batch with a dtype mismatch)."""
    for key, t in state.items():
        owner, _, leaf = key.rpartition(".")
        try:
            mod = qmodel.get_submodule(owner) if owner else qmodel
        except AttributeError:
            continue  # reported by load_state_dict as an unexpected key
        p, b = mod._parameters.get(leaf), mod._buffers.get(leaf)
        own = p if p is not None else b
        if own is None or not (own.is_floating_point() and t.is_floating_point()):
            continue
        if own.dtype == t.dtype:
            continue
        new = own.detach().to(t.dtype)
        if p is not None:
            mod._parameters[leaf] = nn.Parameter(new, requires_grad=p.requires_grad)
        else:
            mod._buffers[leaf] = new


def install_biases(
    path: Path, layers: dict[str, QuantLayer], extra: dict[str, torch.Tensor]
) -> None:
    """The float and corrected biases of bias-corrected layers (``ptqkit.correct.bias``); a
    layer without a bias gains one, as bias correction gave it."""
    for name, layer in layers.items():
        fp, bq = extra.pop(BIAS_FP + name, None), extra.pop(BIAS_Q + name, None)
        if fp is None and bq is None:
            continue
        shape = (layer.weight_fp.shape[0],)
        dev = layer.weight_fp.device
        fp = _float_tensor(path, BIAS_FP + name, fp, shape)
        bq = _float_tensor(path, BIAS_Q + name, bq, shape)
        layer.register_buffer("bias_fp", fp.to(dev), persistent=False)
        layer.register_buffer("bias_q", bq.to(dev), persistent=False)
        layer.select_bias("bias_fp")


def take_biases(path: Path, layers: dict[str, QuantLayer], state: dict[str, torch.Tensor]) -> None:
    """Remove from ``state`` the bias each bias-corrected layer computes with, which must be its
    ``bias_q`` (quantized) or ``bias_fp`` (kept in float): the state is not copied into those."""
    for name, layer in layers.items():
        if not isinstance(getattr(layer, "bias_q", None), torch.Tensor):
            continue
        key = f"{name}.layer.bias"
        which = "bias_q" if layer.quantized else "bias_fp"
        b = state.pop(key, None)
        if b is None or not torch.equal(
            b.to(tensor_attr(layer, "bias_q")), tensor_attr(layer, which)
        ):
            raise _bad(path, key, f"differs from the layer's {which}")


def restore_quantizers(
    path: Path,
    quants: dict[str, ActQuant],
    quant_meta: dict[str, dict[str, Any]],
    state: dict[str, torch.Tensor],
) -> None:
    """Scale, zero point and range of each activation quantizer, and its mode."""
    for name, q in quants.items():
        m = quant_meta[name]
        q.spec = QuantSpec.from_dict(m["spec"])
        dev = q.scale.device
        s, z, r = (state.pop(f"{name}.{k}") for k in ("scale", "zero_point", "range"))
        if s.shape != z.shape:
            raise LoadError(f"{path}: {name}: scale and zero point shapes differ")
        # a dynamic quantizer's scale is computed per input: its buffers stay scalars
        if s.dim() != (1 if q.spec.per_channel and not q.spec.dynamic else 0):
            raise _bad(path, f"{name}.scale", f"has shape {tuple(s.shape)} for spec {q.spec}")
        check_qparams(path, f"{name}.scale/zero_point", s, z, q.spec)
        if r.shape != (2,) or not torch.is_floating_point(r) or not torch.isfinite(r).all():
            raise _bad(path, f"{name}.range", "must be 2 finite floats")
        q.scale, q.zero_point, q.range = s.to(dev), z.to(dev), r.to(dev)
        if m["mode"] not in ("quant", "off"):
            raise LoadError(f"{path}: {name}: unknown quantizer mode {m['mode']!r}")
        q.calibrated = bool(m["calibrated"])
        q.mode = m["mode"]


def check_structural(path: Path, qmodel: nn.Module) -> None:
    """CLE clamps and SmoothQuant scales: finite, ordered, one value per channel of the layer
    they belong to."""
    from .replay import structural_classes

    classes = structural_classes()
    layers_fed: dict[str, list[QuantLayer]] = {}
    producer: dict[str, Any] = {}
    if isinstance(qmodel, fx.GraphModule):
        for node in qmodel.graph.nodes:
            if node.op != "call_module":
                continue
            a = node.args[0] if node.args else None
            mod = submodule(qmodel, node)
            if isinstance(mod, QuantLayer) and isinstance(a, fx.Node) and a.op == "call_module":
                layers_fed.setdefault(target_name(a), []).append(mod)
            if isinstance(a, fx.Node) and a.op == "call_module":
                producer[target_name(node)] = submodule(qmodel, a)
    for name, mod in qmodel.named_modules():
        if isinstance(mod, QuantLayer) and mod.input_quant is not None:
            layers_fed.setdefault(f"{name}.input_quant", []).append(mod)
    if "SmoothedActQuant" in classes:
        for name, mod in qmodel.named_modules():
            if type(mod) is not classes["SmoothedActQuant"][0]:
                continue
            inv = tensor_attr(mod, "inv_scale")
            if inv.dim() != 1 or not (torch.isfinite(inv) & (inv > 0)).all():
                raise _bad(path, f"{name}.inv_scale", "must be a vector of finite values > 0")
            for layer in layers_fed.get(name, []):
                if inv.numel() != layer.weight_fp.shape[-1]:
                    raise _bad(
                        path,
                        f"{name}.inv_scale",
                        f"has {inv.numel()} values for the {layer.weight_fp.shape[-1]} inputs "
                        f"of {layer.name or 'its layer'}",
                    )
    if "ChannelClamp" in classes:
        for name, mod in qmodel.named_modules():
            if type(mod) is not classes["ChannelClamp"][0]:
                continue
            lo, hi = tensor_attr(mod, "lo"), tensor_attr(mod, "hi")
            if lo.shape != hi.shape or lo.dim() != 1 or lo.isnan().any() or (lo > hi).any():
                raise _bad(
                    path, f"{name}.lo/hi", "must be two vectors of the same length, lo <= hi"
                )
            src = producer.get(name)
            if isinstance(src, QuantLayer) and lo.numel() != src.weight_fp.shape[0]:
                raise _bad(
                    path,
                    f"{name}.lo/hi",
                    f"has {lo.numel()} values for the {src.weight_fp.shape[0]} channels of "
                    f"{src.name or 'its layer'}",
                )
