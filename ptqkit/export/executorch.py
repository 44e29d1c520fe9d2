"""``export_pte``: a ptqkit quantized model → an ExecuTorch ``.pte`` program whose conv/linear
layers run on XNNPACK's int8 (qs8) kernels, and :class:`PteModule`, that program run by
ExecuTorch's Python runtime (an optional dependency: ``pip install 'ptqkit[executorch]'``).

The path: :func:`~ptqkit.export.pt2.export_pt2` (ptqkit's integers as pt2e Q/DQ ops) →
:func:`~ptqkit.export.xnnpack.xnnpack_program` (signed int8 activations, float weights where an
output stays float; exact) → :func:`one_dq_per_user` (as ``convert_pt2e``: exact) →
``to_edge_transform_and_lower(…, partitioner=[XnnpackPartitioner()])`` → ``to_executorch()`` →
the ``.pte`` bytes, run once on the example and compared with the simulation before they are
returned or written.

:class:`Delegation` says what XNNPACK took: the partitions and delegated nodes (ExecuTorch's own
``get_delegation_info``), and, read from the XNNPACK graphs the delegate serializes, how many of
the program's conv/linear layers became qs8 conv / fully-connected nodes (int8 input, int8
weights), how many fp32 ones, and how many stayed outside the delegate.

XNNPACK's integer arithmetic (int32 accumulation, ``round(b / (s_in·s_w))`` bias, fp32
requantization) differs from the simulation's float arithmetic by at most about one output step
per layer, as ONNX Runtime's does (:func:`ptqkit.export.parity` measures it).

Dynamic batch: ExecuTorch 1.5 plans memory for an upper bound and its XNNPACK partitioner
narrowed a dynamic batch to 15 here (on ExecuTorch's own ``XNNPACKQuantizer`` model as well), so
the default is the example's static shape; ``dynamic_batch=True`` keeps 1..``max_batch`` where
ExecuTorch keeps it (:attr:`PteModule.max_batch`), and a larger batch is refused by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ExportError, LoadError
from ..io.files import check_writable, write_bytes
from ..quant.primitives import sqnr_db
from .onnx import _check_example, _first_line
from .pt2.program import DQ_OPS, MIN_SQNR_DB, export_pt2, program_report
from .xnnpack import xnnpack_program

PIP = "pip install 'ptqkit[executorch]'"
#: XNNPACK graph node kinds that are a conv/linear layer
XNN_LAYERS = ("XNNConv2d", "XNNDepthwiseConv2d", "XNNConvTranspose2d", "XNNFullyConnected")


def _need_executorch(error: type[ExportError] | type[LoadError]) -> None:
    try:
        import executorch.exir
        import executorch.runtime  # noqa: F401
    except ImportError as e:
        raise error(f"ExecuTorch is not installed ({_first_line(e)}): {PIP}") from None


@dataclasses.dataclass(frozen=True)
class Delegation:
    """What XNNPACK took of a program (see the module docstring). ``int8_layers`` /
    ``float_layers`` are ``None`` when the XNNPACK graphs could not be read."""

    partitions: int
    delegated_nodes: int
    other_nodes: int
    layers: int
    int8_layers: int | None
    float_layers: int | None

    @property
    def outside_layers(self) -> int | None:
        """Conv/linear layers XNNPACK did not take (run by ExecuTorch's portable kernels)."""
        if self.int8_layers is None or self.float_layers is None:
            return None
        return self.layers - self.int8_layers - self.float_layers

    def summary(self) -> str:
        if self.int8_layers is None:
            kinds = "kernel kinds unknown"
        else:
            kinds = (
                f"{self.int8_layers}/{self.layers} conv/linear on XNNPACK qs8 kernels, "
                f"{self.float_layers} fp32, {self.outside_layers} outside the delegate"
            )
        return (
            f"XNNPACK: {self.delegated_nodes} nodes delegated in {self.partitions} "
            f"partitions, {self.other_nodes} not; {kinds}"
        )


class PteModule(nn.Module):
    """An ExecuTorch program's ``forward`` as a torch module (inputs made contiguous).
    ``delegation``: a :class:`Delegation` (``None`` when read from a file); ``max_batch``: the
    largest batch ExecuTorch planned the first input for (its method metadata)."""

    def __init__(self, data: bytes, delegation: Delegation | None = None) -> None:
        super().__init__()
        from executorch.runtime import Runtime

        self.data = data
        self.delegation = delegation
        self._method = Runtime.get().load_program(data).load_method("forward")
        sizes = self._method.metadata.input_tensor_meta(0).sizes()
        self.max_batch = int(sizes[0]) if len(sizes) else 1

    def forward(self, *args: torch.Tensor) -> Any:
        if any(a.dim() and a.shape[0] > self.max_batch for a in args):
            raise ExportError(
                f"batch {args[0].shape[0]} > {self.max_batch}, the largest this .pte program "
                "was planned for (export_pte(..., example) with the batch you need)"
            )
        try:
            outs = self._method.execute([a.detach().contiguous() for a in args])
        except RuntimeError as e:
            meta = self._method.metadata
            planned = [tuple(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
            raise ExportError(
                f"ExecuTorch could not run the program on {[tuple(a.shape) for a in args]} "
                f"(planned for {planned}): {_first_line(e)}"
            ) from e
        return outs[0] if len(outs) == 1 else tuple(outs)


def export_pte(
    qmodel: nn.Module,
    example: Any,
    path: str | os.PathLike | None = None,
    *,
    dynamic_batch: bool = False,
    max_batch: int = 64,
) -> PteModule:
    """Lower a ptqkit quantized model to an ExecuTorch ``.pte`` with XNNPACK delegation.

    Args:
        qmodel: a model returned by :func:`ptqkit.quantize` (left untouched).
        example: a tensor or a tuple of tensors; its shapes are the program's (see
            ``dynamic_batch``).
        path: if given, the ``.pte`` is written there atomically (:func:`load_pte` reads it).
        dynamic_batch: keep dimension 0 dynamic, 1..``max_batch`` (ExecuTorch may narrow it:
            :attr:`PteModule.max_batch` says what it kept).

    Raises:
        ExportError: no ExecuTorch (names the pip package), anything
            :func:`~ptqkit.export.pt2.export_pt2` refuses, activation grids XNNPACK cannot
            run exactly (:mod:`ptqkit.export.xnnpack`), a lowering failure, or a program whose
            output differs from the simulation (SQNR < 20 dB on the example).
    """
    _need_executorch(ExportError)
    target = check_writable(path, ExportError) if path is not None else None
    args = _check_example(qmodel, example)
    program = export_pt2(qmodel, args, dynamic_batch=dynamic_batch)
    xprog, _ = xnnpack_program(program, max_batch=max_batch if dynamic_batch else None)
    one_dq_per_user(xprog)
    data, delegation = _lower(xprog)
    try:
        module = PteModule(data, delegation)
    except RuntimeError as e:  # XNNPACK compiles its graphs when the method is loaded
        raise ExportError(
            f"ExecuTorch cannot load the lowered program (XNNPACK refused a node): "
            f"{_first_line(e)}; {delegation.summary()}"
        ) from e
    _verify(qmodel, module, args)
    if target is not None:
        write_bytes(target, data, ExportError)
    return module


def load_pte(path: str | os.PathLike) -> PteModule:
    """A ``.pte`` file as a :class:`PteModule`. :class:`LoadError` for no ExecuTorch (names the
    pip package), a missing file or bytes ExecuTorch cannot load."""
    _need_executorch(LoadError)
    if not os.path.isfile(path):
        raise LoadError(f"cannot load {path}: no such file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return PteModule(data)
    except Exception as e:
        raise LoadError(f"cannot load {path} as an ExecuTorch program: {_first_line(e)}") from e


def one_dq_per_user(program: torch.export.ExportedProgram) -> int:
    """Give every further user of a shared ``dequantize`` its own copy, in place, as
    ``convert_pt2e`` emits them; returns how many copies were made.

    ptqkit's program dequantizes a tensor once for all its users (a block's input feeds its
    expand conv and its residual add). XNNPACK's partitioner takes a DQ into the partition of
    the op it feeds, and on EfficientNet-Lite0 one DQ feeding a conv and an add in different
    partitions made ExecuTorch 1.5 refuse the program ("Invalid partition, found dependency
    cycles"). Exact: ``DQ(q) = (q - z)·s`` is elementwise and pure, each copy computes the same.
    """
    graph = program.graph_module.graph
    copies = 0
    for node in list(graph.nodes):
        name = str(getattr(node.target, "__name__", "")).split(".")[0]
        if node.op != "call_function" or name not in DQ_OPS or len(node.users) < 2:
            continue
        for user in list(node.users)[1:]:
            with graph.inserting_before(user):
                user.replace_input_with(node, graph.node_copy(node))
            copies += 1
    if copies:
        graph.lint()
        program.graph_module.recompile()
    return copies


def _lower(program: torch.export.ExportedProgram) -> tuple[bytes, Delegation]:
    """``to_edge_transform_and_lower`` with the XNNPACK partitioner, then ``to_executorch``;
    returns the bytes and the :class:`Delegation`."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        with _xnn_graphs() as graphs:
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        lowered = edge.exported_program()
        data = edge.to_executorch().buffer
    except Exception as e:
        raise ExportError(f"ExecuTorch lowering (XNNPACK) failed: {_first_line(e)}") from e
    return data, _delegation(lowered, graphs, len(program_report(program).layers))


@contextlib.contextmanager
def _xnn_graphs() -> Iterator[list[Any]]:
    """Collect the ``XNNGraph`` objects the XNNPACK delegate serializes while lowering (empty
    when this ExecuTorch serializes elsewhere: the kinds are then reported unknown)."""
    graphs: list[Any] = []
    try:
        import executorch.backends.xnnpack.xnnpack_preprocess as pre

        original = pre.serialize_xnnpack_binary
    except (ImportError, AttributeError):
        yield graphs
        return

    def capture(graph: Any, *args: Any, **kwargs: Any) -> Any:
        graphs.append(graph)
        return original(graph, *args, **kwargs)

    pre.serialize_xnnpack_binary = capture
    try:
        yield graphs
    finally:
        pre.serialize_xnnpack_binary = original


def _delegation(
    lowered: torch.export.ExportedProgram, graphs: list[Any], layers: int
) -> Delegation:
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(lowered.graph_module)
    int8 = fp32 = 0
    for g in graphs:
        for xnode in g.xnodes:
            node = xnode.xnode_union
            if type(node).__name__ not in XNN_LAYERS:
                continue
            quantized = _is_int8(g.xvalues[node.input1_id]) and _is_int8(g.xvalues[node.filter_id])
            int8, fp32 = int8 + quantized, fp32 + (not quantized)
    known = bool(graphs) or info.num_delegated_subgraphs == 0
    return Delegation(
        partitions=info.num_delegated_subgraphs,
        delegated_nodes=info.num_delegated_nodes,
        other_nodes=info.num_non_delegated_nodes,
        layers=layers,
        int8_layers=int8 if known else None,
        float_layers=fp32 if known else None,
    )


def _is_int8(xvalue: Any) -> bool:
    """An XNNPACK value of an 8-bit integer type (qint8 per tensor, qcint8 per channel)."""
    value = xvalue.xvalue_union
    tensor = getattr(value, "tensor_value", value)
    return getattr(tensor.datatype, "name", "") in ("xnn_datatype_qint8", "xnn_datatype_qcint8")


def _verify(qmodel: nn.Module, module: PteModule, args: tuple) -> None:
    with torch.no_grad():
        ref, got = qmodel(*args), module(*args)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = got if isinstance(got, tuple) else (got,)
    for i, (r, g) in enumerate(zip(ref, got)):
        if not isinstance(r, torch.Tensor) or r.shape != g.shape:
            raise ExportError(f"the .pte program's output {i} differs in shape from the model's")
        if r.is_floating_point() and r.numel() and sqnr_db(r, g) < MIN_SQNR_DB:
            raise ExportError(
                f"the .pte program's output {i} differs from the simulation (SQNR "
                f"{sqnr_db(r, g):.1f} dB < {MIN_SQNR_DB:.0f} dB): not returned"
            )


__all__ = [
    "PIP",
    "XNN_LAYERS",
    "Delegation",
    "PteModule",
    "export_pte",
    "load_pte",
    "one_dq_per_user",
]
