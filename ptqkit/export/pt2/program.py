"""``export_pt2``: a ptqkit quantized model → a ``torch.export`` program with the standard pt2e
Q/DQ ops (``torch.ops.quantized_decomposed``), the representation ``torch.compile``/Inductor's
x86 int8 lowering, AOTInductor and ExecuTorch's XNNPACK delegate consume.

The program carries ptqkit's integers: every quantized Conv/Linear reads an integer weight
constant through ``dequantize_per_channel`` (per-channel symmetric int8 by default), every
activation quantizer becomes ``quantize_per_tensor → dequantize_per_tensor`` with its exact
scale and zero point, at the places ptqkit put it (inputs of conv/linear, both inputs of a
residual add, after the ReLU/ReLU6 that follows a conv, ...). Layers ptqkit kept in float
(fallback, skip) stay float ops, between the DQ and Q of their neighbours. A conv behind a zero
pad (or a max-pool, a flatten) gets its own exact ``Q → DQ`` (:mod:`ptqkit.export.pt2.passes`),
so that Inductor lowers it too. See :mod:`ptqkit.export.pt2.modules` for the grids.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ...errors import ExportError
from ...io.files import check_writable, write_bytes
from ...quant.primitives import sqnr_db
from ..onnx import _check_example, _first_line, quantized_parts
from .modules import qd_ops, swap_modules
from .passes import requantize_passthrough

#: aten ops of the program that are a Conv/Linear (the layers ptqkit quantizes)
LAYER_OPS = (
    "conv1d",
    "conv2d",
    "conv3d",
    "convolution",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "linear",
)
Q_OPS = ("quantize_per_tensor", "quantize_per_channel")
DQ_OPS = ("dequantize_per_tensor", "dequantize_per_channel")


def export_pt2(
    qmodel: nn.Module,
    example: Any,
    path: str | os.PathLike | None = None,
    *,
    dynamic_batch: bool = True,
) -> torch.export.ExportedProgram:
    """Export a ptqkit quantized model as a ``torch.export.ExportedProgram`` with pt2e Q/DQ ops.

    Args:
        qmodel: a model returned by :func:`ptqkit.quantize` (left untouched).
        example: a tensor or a tuple of tensors the model takes; run first.
        path: if given, the program is also saved there (``torch.export.save``, a ``.pt2``
            zip), atomically; :func:`load_pt2` reads it back.
        dynamic_batch: dimension 0 of every input is dynamic (one shared ``batch`` dim, >= 1).

    Raises:
        ExportError: not a ptqkit quantized model, a quantizer still calibrating, group-wise
            weights, an example the model rejects, a model torch.export cannot capture (or
            whose batch dimension is not free), a path that cannot be written, or no
            ``quantized_decomposed`` ops in this PyTorch (names the pip package).
    """
    qd_ops()
    check_pt2_exportable(qmodel)
    target = check_writable(path, ExportError) if path is not None else None
    args = _check_example(qmodel, example)
    model = swap_modules(qmodel).eval()
    program = _export(model, args, dynamic_batch)
    requantize_passthrough(program.graph_module, LAYER_OPS)
    _verify(qmodel, program, args)
    if target is not None:
        buf = io.BytesIO()
        torch.export.save(program, buf)
        write_bytes(target, buf.getvalue(), ExportError)
    return program


def load_pt2(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """``torch.export.load`` of a program :func:`export_pt2` saved, with the Q/DQ ops registered
    first (``ExportError`` for a missing or unreadable file)."""
    qd_ops()
    if not os.path.isfile(path):
        raise ExportError(f"cannot load {path}: no such file")
    try:
        return torch.export.load(path)
    except Exception as e:
        raise ExportError(f"cannot load {path} as a torch.export program: {_first_line(e)}") from e


def check_pt2_exportable(qmodel: Any) -> None:
    """Raise :class:`ExportError` unless ``qmodel`` is a ptqkit quantized model whose grids the
    pt2e ops can state (no quantizer still calibrating, no group-wise weights)."""
    quantized_parts(
        qmodel, "the pt2e ops dequantize per channel or per tensor and would compute other weights"
    )


def _export(model: nn.Module, args: tuple, dynamic_batch: bool) -> torch.export.ExportedProgram:
    shapes = None
    if dynamic_batch:
        if any(a.dim() == 0 for a in args):
            raise ExportError("dynamic_batch needs inputs with a batch dimension (a 0-d input)")
        batch = torch.export.Dim("batch", min=1)
        shapes = tuple({0: batch} for _ in args)
        # torch.export specializes a size-1 dimension: trace a batch of 2 (its own repeat)
        if all(a.shape[0] == 1 for a in args):
            args = tuple(torch.cat([a, a]) for a in args)
    try:
        with torch.no_grad():
            return torch.export.export(model, args, dynamic_shapes=shapes, strict=False)
    except Exception as e:
        hint = (
            " (its batch dimension is not free: pass dynamic_batch=False)"
            if dynamic_batch and "batch" in str(e)
            else ""
        )
        raise ExportError(f"torch.export failed{hint}: {_first_line(e)}") from None


#: the program must reproduce the simulation to this SQNR on the example (a flipped rounding
#: tie moves one element by one step, far above it; a wrong scale or axis falls far below)
MIN_SQNR_DB = 20.0


def _verify(qmodel: nn.Module, program: torch.export.ExportedProgram, args: tuple) -> None:
    """Run the program on the example and compare with the simulation (:data:`MIN_SQNR_DB`)."""
    with torch.no_grad():
        ref = tree_leaves(qmodel(*args))
        got = tree_leaves(program.module()(*args))
    pairs = [(r, g) for r, g in zip(ref, got) if isinstance(r, torch.Tensor)]
    if len(ref) != len(got) or any(r.shape != g.shape for r, g in pairs):
        raise ExportError(
            "the exported program's outputs differ in number or shape from the model's"
        )
    for i, (r, g) in enumerate(pairs):
        if r.is_floating_point() and r.numel() and sqnr_db(r, g) < MIN_SQNR_DB:
            raise ExportError(
                f"the exported program's output {i} differs from the simulation "
                f"(SQNR {sqnr_db(r, g):.1f} dB < {MIN_SQNR_DB:.0f} dB): not returned"
            )


# -- what the program holds ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerQDQ:
    """One Conv/Linear node of a program: whether its weight is an integer constant read by a
    DQ (``int_weight``) and whether its input comes from a DQ (``quantized_input``)."""

    node: str
    op: str
    int_weight: bool
    quantized_input: bool


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """The Q/DQ structure of a program: its Conv/Linear nodes and its Q/DQ op counts."""

    layers: tuple[LayerQDQ, ...]
    quantize: int
    dequantize: int

    @property
    def int8_layers(self) -> int:
        """Conv/Linear nodes in the int8 pattern: DQ'd integer weight and DQ'd input."""
        return sum(1 for layer in self.layers if layer.int_weight and layer.quantized_input)

    @property
    def float_layers(self) -> tuple[str, ...]:
        """Conv/Linear nodes that compute with a float weight (kept float by ptqkit)."""
        return tuple(layer.node for layer in self.layers if not layer.int_weight)

    def summary(self) -> str:
        return (
            f"{self.int8_layers}/{len(self.layers)} conv/linear with int8 weight and input, "
            f"{len(self.float_layers)} float; {self.quantize} Q, {self.dequantize} DQ"
        )


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _is(node: Any, names: tuple[str, ...]) -> bool:
    return (
        isinstance(node, torch.fx.Node) and node.op == "call_function" and (_op_name(node) in names)
    )


def program_report(program: torch.export.ExportedProgram) -> ProgramReport:
    """Count the Q/DQ ops of ``program`` and classify each Conv/Linear node."""
    nodes = list(program.graph.nodes)
    layers = []
    for n in nodes:
        if not _is(n, LAYER_OPS):
            continue
        x, w = n.args[0], n.args[1]
        layers.append(LayerQDQ(n.name, _op_name(n), _is(w, DQ_OPS), _is(x, DQ_OPS)))
    return ProgramReport(
        layers=tuple(layers),
        quantize=sum(1 for n in nodes if _is(n, Q_OPS)),
        dequantize=sum(1 for n in nodes if _is(n, DQ_OPS)),
    )


__all__ = [
    "LayerQDQ",
    "ProgramReport",
    "check_pt2_exportable",
    "export_pt2",
    "load_pt2",
    "program_report",
]
