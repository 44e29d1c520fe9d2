"""Weight-only Linears (float activations, ``b``-bit weights, group-wise or per channel) in the
exported ONNX graph, in one of two forms ONNX Runtime runs:

* ``"matmulnbits"``: ONNX Runtime's contrib op ``com.microsoft.MatMulNBits`` (opset 1 of that
  domain; checked on onnxruntime 1.32), ``Y = A · dequant(B)ᵀ`` (the bias an ``Add`` after) with
  ``dequant(B)[n, k] = (u[n, k] - z[n, k // bs]) · s[n, k // bs]``: ``B`` is ``uint8``
  ``[N, ceil(K/bs), bs·bits/8]`` (element ``k`` of a block in the low bits first), ``scales``
  ``[N, ceil(K/bs)]``, ``zero_points`` packed the same way (absent: ``2^(bits-1)``), attributes
  ``K, N, bits, block_size, accuracy_level``. Its CPU kernel takes ``bits`` 2, 4 or 8 (3 is
  refused by the runtime: "Only 2b, 4b and 8b"), so 3-bit weights go into the 4-bit container,
  exactly (``u = q - qmin + z``-shifted, below). ``block_size`` must be a power of two ≥ 16.
  ``accuracy_level = 0``: ``A`` stays float32, so the runtime computes what the simulation does.
* ``"qdq"``: ``DequantizeLinear`` with ``block_size`` (opset 21) on an ``int4``/``uint4``
  (or ``int8``/``uint8``) ``[K, N]`` initializer, then ``MatMul`` (+ ``Add`` bias): the standard
  form; any group size. The file is opset 21. ONNX Runtime fuses it into MatMulNBits itself,
  with ``accuracy_level = 4`` unless the session says otherwise (``A`` quantized to int8 per
  block: measured 3.5e-3 off the simulation on a W4 g32 MLP whose outputs are ~1): set the
  session config entry ``session.qdq_matmulnbits_accuracy_level = "0"``, as
  :func:`ptqkit.export.runtime.session_options` does.

Integers: ptqkit's grid ``[qmin, qmax]`` (symmetric ``[-2^(b-1), 2^(b-1)-1]``, ``z = 0``; or
asymmetric ``[0, 2^b-1]``) maps onto the container's unsigned grid of ``c`` bits as
``u = q + 2^(c-1)``, ``z_u = 2^(c-1)`` when symmetric, ``u = q``, ``z_u = z`` when not:
``(u - z_u)·s = (q - z)·s`` exactly. Per-channel weights repeat the channel's scale over
``ceil(K/bs)`` blocks (exact). A ``K`` the block does not divide: ptqkit's last group is
shorter, the container's last block is padded with ``u = z_u`` (dequantized 0, multiplied by
no input), the layout both ops specify.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from ..errors import ExportError
from ..quant.modules import ActQuant, QuantLayer, quant_layers

WEIGHT_ONLY_FORMS = ("matmulnbits", "qdq")
MS_DOMAIN, OUR_DOMAIN, PLACEHOLDER = "com.microsoft", "ptqkit", "WeightOnlyLinear"
NBITS_BITS = (2, 4, 8)  # what the CPU kernel of MatMulNBits takes (onnxruntime 1.32)
QDQ_OPSET = 21  # DequantizeLinear with block_size and int4 / uint4
PER_CHANNEL_BLOCK = 128


def check_form(form: str) -> str:
    if form not in WEIGHT_ONLY_FORMS:
        raise ExportError(f"weight_only must be one of {WEIGHT_ONLY_FORMS}, got {form!r}")
    return form


def select(qmodel: Any, args: tuple) -> dict[str, QuantLayer]:
    """The weight-only Linears of ``qmodel``: quantized ``nn.Linear`` layers with fewer than 8
    bits or group-wise weights whose input is float (no input quantizer, and not the output of
    a static activation quantizer: seen in one forward pass on ``args``). A model that rejects
    ``args`` gives ``{}`` (the export's own example check says why)."""
    if not isinstance(qmodel, nn.Module):
        return {}
    cands = {
        n: m
        for n, m in quant_layers(qmodel).items()
        if m.quantized
        and type(m.layer).forward is nn.Linear.forward
        and (m.spec.group_size is not None or m.spec.bits < 8)
        and (m.input_quant is None or m.input_quant.mode == "off")
    }
    if not cands:
        return {}
    quantized: set[int] = set()
    inputs: dict[str, int] = {}

    def after(mod: nn.Module, _: Any, out: Any) -> None:
        static = not mod.spec.dynamic and mod.mode == "quant"  # type: ignore[union-attr]
        if static and isinstance(out, torch.Tensor):
            quantized.add(out.data_ptr())

    def before(name: str) -> Any:
        def hook(_: nn.Module, a: tuple) -> None:
            if a and isinstance(a[0], torch.Tensor):
                inputs[name] = a[0].data_ptr()

        return hook

    handles = [m.register_forward_hook(after) for m in qmodel.modules() if isinstance(m, ActQuant)]
    handles += [m.register_forward_pre_hook(before(n)) for n, m in cands.items()]
    try:
        with torch.no_grad():
            qmodel(*args)
    except Exception:
        return {}
    finally:
        for h in handles:
            h.remove()
    return {n: m for n, m in cands.items() if n in inputs and inputs[n] not in quantized}


# -- the integers in the containers -------------------------------------------------------------
def container_bits(bits: int) -> int:
    """The container of ``bits``-bit weights: 2, 4 (for 3 and 4) or 8."""
    return 2 if bits == 2 else 4 if bits <= 4 else 8


def block_of(layer: QuantLayer, form: str) -> int | None:
    """The block size along K: the group size, or (per channel) ``PER_CHANNEL_BLOCK`` for
    MatMulNBits (``None``: one scale per output channel, DequantizeLinear's ``axis`` form)."""
    k = int(layer.weight_int.shape[1])
    g = layer.spec.group_size
    if g is not None and g < k:
        if form == "matmulnbits" and (g < 16 or g & (g - 1)):
            raise ExportError(
                f"layer {layer.name}: group_size={g}: MatMulNBits needs a block size that is a "
                "power of two >= 16; export it with weight_only='qdq' (DequantizeLinear takes "
                "any block size) or quantize with group_size 16/32/64/128"
            )
        return g
    if form == "qdq":
        return None
    return min(PER_CHANNEL_BLOCK, max(16, 1 << (k - 1).bit_length()))


def unsigned(layer: QuantLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(u [N, K], z_u [N, G], s [N, G], c)``: the weights on the ``c``-bit unsigned grid of
    the module docstring, with ``G`` groups (1 per channel) of zero points and scales."""
    c = container_bits(layer.spec.bits)
    q = layer.weight_int.detach().cpu().to(torch.int32).numpy()
    s = layer.weight_scale.detach().cpu().float().numpy().reshape(q.shape[0], -1)
    z = layer.weight_zero_point.detach().cpu().to(torch.int32).numpy().reshape(q.shape[0], -1)
    shift = 2 ** (c - 1) if layer.spec.symmetric else 0
    return (q + shift).astype(np.uint8), (z + shift).astype(np.uint8), s, c


def _blocks(u: np.ndarray, z: np.ndarray, s: np.ndarray, bs: int) -> tuple[np.ndarray, ...]:
    """``u`` padded to ``[N, nb, bs]`` with its zero point; ``z``, ``s`` as ``[N, nb]``."""
    n, k = u.shape
    nb = math.ceil(k / bs)
    if z.shape[1] == 1 and nb > 1:  # per channel: the channel's parameters in every block
        z, s = np.repeat(z, nb, 1), np.repeat(s, nb, 1)
    pad = np.repeat(z, bs, 1)[:, : nb * bs].copy()
    pad[:, :k] = u
    return pad.reshape(n, nb, bs), z, s


def pack_bits(u: np.ndarray, bits: int) -> np.ndarray:
    """The last axis of ``u`` (``bits``-bit values) packed ``8/bits`` per byte, element ``i``
    of a byte in bits ``[i·bits, (i+1)·bits)`` (low first); the last axis padded with 0."""
    per = 8 // bits
    tail = (-u.shape[-1]) % per
    if tail:
        u = np.concatenate([u, np.zeros((*u.shape[:-1], tail), np.uint8)], -1)
    u = u.reshape(*u.shape[:-1], -1, per).astype(np.uint16)
    out = np.zeros(u.shape[:-1], np.uint16)
    for i in range(per):
        out |= u[..., i] << (i * bits)
    return out.astype(np.uint8)


# -- the trace: one placeholder node per layer, rewritten after the export -----------------------
class _WeightOnly(torch.autograd.Function):
    """The simulation's Linear (``x · Ŵᵀ + b``); traced as one ``ptqkit.WeightOnlyLinear`` node
    whose inputs are ``x`` and the layer's index (the rewrite takes the integers from it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, index: int) -> torch.Tensor:
        return x @ w.t()

    @staticmethod
    def symbolic(g: Any, x: Any, w: Any, index: int) -> Any:
        return g.op(f"{OUR_DOMAIN}::{PLACEHOLDER}", x, index_i=index)


def _forward(self: QuantLayer, x: torch.Tensor) -> torch.Tensor:
    if not torch.onnx.is_in_onnx_export():
        return type(self).forward(self, x)
    if x.dtype != torch.float32:
        raise ExportError(
            f"layer {self.name}: weight-only export writes float32 activations and scales; its "
            f"input is {x.dtype}: export the float32 model (qmodel.float())"
        )
    y = _WeightOnly.apply(x, self.weight.to(x.dtype), self._ptq_nbits_index)
    return y if self.bias is None else y + self.bias


@contextlib.contextmanager
def tracing(layers: dict[str, QuantLayer]) -> Iterator[list[QuantLayer]]:
    """While exporting, each of ``layers`` traces as a placeholder node; yields their order."""
    order = list(layers.values())
    for i, layer in enumerate(order):
        layer._ptq_nbits_index = i  # type: ignore[assignment]
        layer.forward = types.MethodType(_forward, layer)  # type: ignore[method-assign]
    try:
        yield order
    finally:
        for layer in order:
            del layer.forward
            del layer._ptq_nbits_index


# -- the rewrite -----------------------------------------------------------------------------------
def _matmulnbits(layer: QuantLayer, a: str, y: str, inits: list) -> list[onnx.NodeProto]:
    u, z, s, c = unsigned(layer)
    n, k = u.shape
    bs = block_of(layer, "matmulnbits")
    assert bs is not None
    ub, zb, sb = _blocks(u, z, s, bs)
    base = f"{layer.name or 'linear'}.nbits"
    names = [f"{base}.B", f"{base}.scales"]
    inits += [
        numpy_helper.from_array(pack_bits(ub, c), names[0]),
        numpy_helper.from_array(sb.astype(np.float32), names[1]),
    ]
    if not layer.spec.symmetric:  # symmetric: the default zero point 2^(c-1)
        names.append(f"{base}.zero_points")
        inits.append(numpy_helper.from_array(pack_bits(zb, c), names[-1]))
    return [
        helper.make_node(
            "MatMulNBits",
            [a, *names],
            [y],
            f"{base}.MatMulNBits",
            domain=MS_DOMAIN,
            K=k,
            N=n,
            bits=c,
            block_size=bs,
            accuracy_level=0,
        )
    ]


def _dq_matmul(layer: QuantLayer, a: str, y: str, inits: list) -> list[onnx.NodeProto]:
    """``MatMul(a, DequantizeLinear(W [K, N], s, z, axis=0, block_size))``: ptqkit's integers
    as they are (signed with no zero point when symmetric, unsigned with ``z`` when not) in
    ``int4``/``uint4`` (2..4 bits; no int2 before opset 25) or ``int8``/``uint8``."""
    sym, wide = layer.spec.symmetric, layer.spec.bits > 4
    t = onnx.TensorProto
    dtype = {
        (False, True): t.INT4,
        (False, False): t.UINT4,
        (True, True): t.INT8,
        (True, False): t.UINT8,
    }[(wide, sym)]
    q = layer.weight_int.detach().cpu().to(torch.int32).numpy()
    n = q.shape[0]
    s = layer.weight_scale.detach().cpu().float().numpy().reshape(n, -1)
    z = layer.weight_zero_point.detach().cpu().to(torch.int32).numpy().reshape(n, -1)
    bs = block_of(layer, "qdq")
    base = f"{layer.name or 'linear'}.wq"
    names = [f"{base}.weight", f"{base}.scale"]
    inits += [
        _small_int(np.ascontiguousarray(q.T), dtype, names[0]),
        numpy_helper.from_array(np.ascontiguousarray(s.T if bs else s[:, 0]), names[1]),
    ]
    if not sym:
        names.append(f"{base}.zero_point")
        inits.append(_small_int(np.ascontiguousarray(z.T if bs else z[:, 0]), dtype, names[-1]))
    attrs: dict[str, Any] = {"axis": 0 if bs else 1}
    if bs:
        attrs["block_size"] = bs
    w = f"{base}.dq"
    return [
        helper.make_node("DequantizeLinear", names, [w], f"{base}.DequantizeLinear", **attrs),
        helper.make_node("MatMul", [a, w], [y], f"{base}.MatMul"),
    ]


def _small_int(arr: np.ndarray, dtype: int, name: str) -> onnx.TensorProto:
    """An integer initializer of ONNX ``dtype``; 4-bit types packed two per byte (raw data)."""
    if dtype in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
        np_t = np.int8 if dtype == onnx.TensorProto.INT8 else np.uint8
        return numpy_helper.from_array(arr.astype(np_t), name)
    nib = (arr.reshape(-1) & 0x0F).astype(np.uint8)
    return helper.make_tensor(name, dtype, list(arr.shape), pack_bits(nib, 4).tobytes(), raw=True)


def rewrite(model: onnx.ModelProto, order: list[QuantLayer], form: str) -> int:
    """Replace every placeholder node by the ``form`` of its layer (module docstring); returns
    how many. The opset imports follow: ``com.microsoft`` 1, or the default domain at 21."""
    graph, done = model.graph, 0
    inits: list[onnx.TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain != OUR_DOMAIN:
            new_nodes.append(node)
            continue
        layer = order[int(helper.get_attribute_value(node.attribute[0]))]
        make = _matmulnbits if form == "matmulnbits" else _dq_matmul
        new_nodes += make(layer, node.input[0], node.output[0], inits)
        done += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(inits)
    kept = [o for o in model.opset_import if o.domain != OUR_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    if done and form == "matmulnbits":
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    elif done:
        _to_opset(model, QDQ_OPSET)
    return done


def _to_opset(model: onnx.ModelProto, opset: int) -> None:
    """The default domain at ``opset`` (ops converted by ONNX's version converter)."""
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, opset)
    except Exception as e:
        raise ExportError(
            f"weight_only='qdq' writes opset {opset} (DequantizeLinear with block_size) and "
            f"the graph cannot be converted to it: {str(e).splitlines()[0][:200]}; use "
            "weight_only='matmulnbits'"
        ) from None
    model.CopyFrom(converted)


__all__ = ["WEIGHT_ONLY_FORMS", "check_form", "pack_bits", "rewrite", "select", "tracing"]
