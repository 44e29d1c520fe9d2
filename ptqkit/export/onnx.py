"""``export_onnx``: a ptqkit quantized model → a QDQ ONNX file that ONNX Runtime runs on its
integer kernels (``QLinearConv``, ``QGemm``, ``QLinearMatMul``, ``QLinearAdd``, ...).

The grids agree with the simulation by construction: activations are ``uint8`` asymmetric
(``[0, 255]``, integer zero point) or ``int8`` symmetric (``[-128, 127]``, zero point 0) — the
same grids as ONNX ``QuantizeLinear`` — and weights are ``int8`` full range (symmetric scales
use ``2^(b-1) - 1`` so ``-128`` only appears with clipped ranges). Weights of fewer than 8 bits
are stored exactly in ``int8``/``uint8`` containers. ``QuantizeLinear`` rounds half to even like
the simulation. What can still differ is the arithmetic inside an integer kernel (int32 bias
``round(b / s_in·s_w)``, the requantization multiplier), a last-bit effect worth at most about
one output step per layer; :mod:`ptqkit.export.runtime` measures it.

Activations of other than 8 bits have no integer kernel in ONNX Runtime's CPU provider; they
are refused with :class:`~ptqkit.errors.ExportError`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from ..errors import ExportError
from ..io.files import check_writable, write_bytes
from ..quant.modules import act_quants, quant_layers
from . import onnx_nbits, tensorrt
from .onnx_dynamic import check_dynamic, matmul_weights_to_uint8
from .onnx_encodings import strip_qdq
from .passes import PASSES, run_passes
from .weights import resolve_weight_dtype, weights_to_uint8

FORMATS = ("qdq", "fp32+encodings")
MIN_OPSET, MAX_OPSET = 13, 20  # per-channel Q/DQ needs 13; the TorchScript exporter stops at 20


def export_onnx(
    qmodel: nn.Module,
    path: str | os.PathLike,
    example_input: Any,
    opset: int = 17,
    *,
    format: str = "qdq",
    dynamic_batch: bool = True,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    weights: str = "auto",
    target: str = "onnxruntime",
    weight_only: str = "matmulnbits",
) -> Path:
    """Export a ptqkit quantized model to ONNX and return the written path.

    Args:
        qmodel: a model returned by :func:`ptqkit.quantize`.
        path: the ``.onnx`` file to write (its folder must exist). Written atomically.
        example_input: a tensor (or a tuple of tensors) of the shape the model takes; the model
            is run on it first, and the batch dimension is exported as dynamic.
        opset: ONNX opset, 13..20.
        format: ``"qdq"`` (int8 weights, ``QuantizeLinear``/``DequantizeLinear`` pairs, int32
            biases) or ``"fp32+encodings"`` (a float ONNX plus ``<path>.encodings.json`` with the
            scale, zero point and bits of every quantized tensor, for runtimes that quantize
            themselves).
        dynamic_batch: export dimension 0 of every input and output as dynamic.
        input_names, output_names: ONNX names (default ``input``/``output``, numbered if many).
        weights: container of the integer weights: ``"int8"``, ``"uint8"`` (the same values,
            zero point + 128) or ``"auto"`` (default: ``int8`` where ONNX Runtime's u8×s8 kernels
            are exact on this CPU, ``uint8`` on x86 without VNNI, where they saturate; see
            :mod:`ptqkit.export.weights`).
        target: ``"onnxruntime"`` (default), ``"openvino"`` (the same file with ``int8``
            weights on every CPU: :mod:`ptqkit.export.openvino`) or ``"tensorrt"``: signed
            int8 activations, float biases, checked against TensorRT's Q/DQ rules; needs a model
            quantized with symmetric int8 activations (:mod:`ptqkit.export.tensorrt`).
        weight_only: the form of weight-only Linears (float input, weights group-wise or of
            fewer than 8 bits): ``"matmulnbits"`` (default: ONNX Runtime's
            ``com.microsoft.MatMulNBits``, packed 2/4-bit weights; 3-bit in the 4-bit
            container) or ``"qdq"`` (``DequantizeLinear`` with ``block_size`` on int4/uint4
            weights + ``MatMul``: the file is opset 21) (:mod:`ptqkit.export.onnx_nbits`).

    Raises:
        ExportError: not a ptqkit quantized model, unsupported bits, a path that cannot be
            written, an example input the model rejects, or an op the exporter cannot handle.
    """
    if format not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {format!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset must be an int in {MIN_OPSET}..{MAX_OPSET}, got {opset!r}")
    onnx_nbits.check_form(weight_only)
    wo = {}  # weight-only Linears: MatMulNBits / block DequantizeLinear (ONNX Runtime only)
    if (format, target) == ("qdq", "onnxruntime"):
        ex = example_input
        wo = onnx_nbits.select(qmodel, tuple(ex) if isinstance(ex, (tuple, list)) else (ex,))
    check_exportable(qmodel, set(wo))
    check_dynamic(act_quants(qmodel), target, format)  # run-time scales: MatMulInteger
    weight_dtype = resolve_weight_dtype(tensorrt.check_target(target, format, weights, qmodel))
    path = _check_path(path)
    args = _check_example(qmodel, example_input)
    with onnx_nbits.tracing(wo) as order:
        model = _torch_export(qmodel, args, opset, dynamic_batch, input_names, output_names)
    onnx_nbits.rewrite(model, order, weight_only)
    encodings = _finish(model, target, format, weight_dtype)
    _write(path, model.SerializeToString())
    if encodings is not None:
        _write(encodings_path(path), json.dumps(encodings, indent=1).encode())
    return path


def _finish(
    model: onnx.ModelProto, target: str, format: str, weight_dtype: str
) -> dict[str, Any] | None:
    """The exported graph made ready to write, in place: the passes (:mod:`.passes`, with
    TensorRT's for that target), the target's rules checked, the weights in their container
    (or the Q/DQ stripped, ``"fp32+encodings"``: returns the encodings), the ONNX checker run."""
    run_passes(model, tensorrt.passes(list(PASSES), target))
    broken = tensorrt.violations(model) if target == "tensorrt" else []
    if broken:  # ptqkit's placement where TensorRT wants another: not written
        raise ExportError(
            f"the graph breaks TensorRT's Q/DQ rules at {len(broken)} places: "
            + "; ".join(broken[:3])
        )
    encodings = None
    if format == "fp32+encodings":
        encodings = strip_qdq(model)
    elif weight_dtype == "uint8":
        weights_to_uint8(model)
        matmul_weights_to_uint8(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:  # a bug of ptqkit's passes, not the user's
        raise ExportError(f"the exported graph is invalid: {_first_line(e)}") from e
    return encodings


def encodings_path(path: str | os.PathLike) -> Path:
    """Where ``format="fp32+encodings"`` writes the encodings of ``path``."""
    p = Path(path)
    return p.with_name(p.stem + ".encodings.json")


# -- checks --------------------------------------------------------------------------------------
def quantized_parts(
    qmodel: Any, groupwise: str, dynamic: bool = False, weight_only: set[str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(quantized layers, activation quantizers)`` of ``qmodel`` after the checks every export
    shares (raising :class:`ExportError`): a ptqkit quantized ``nn.Module``, no quantizer still
    calibrating, no group-wise weights (``groupwise``: why this export cannot state them), no
    dynamic activation quantizer unless the export writes them (``dynamic``); the layers named
    in ``weight_only`` are written in a weight-only form and may be group-wise."""
    if not isinstance(qmodel, nn.Module):
        raise ExportError(f"expected a ptqkit quantized nn.Module, got {type(qmodel).__name__}")
    layers, quants = quant_layers(qmodel), act_quants(qmodel)
    if not layers and not quants:
        raise ExportError(
            f"{type(qmodel).__name__} is not a ptqkit quantized model (no QuantLayer or "
            "ActQuant inside); quantize it first: ptqkit.quantize(model, data, config)"
        )
    for name, q in quants.items():
        if q.mode == "observe":
            raise ExportError(f"activation quantizer {name} is still calibrating (mode 'observe')")
        if q.spec.dynamic and q.mode == "quant" and not dynamic:
            raise ExportError(f"{name} ({q.label}) is dynamic (scales computed at run time): "
                              f"this export has no form for it; export_onnx writes it")
    for name, layer in layers.items():
        grouped = layer.quantized and layer.spec.group_size is not None
        if grouped and name not in (weight_only or ()):
            raise ExportError(
                f"layer {name} has group-wise weights (group_size={layer.spec.group_size}, "
                f"scales {tuple(layer.weight_scale.shape)}); {groupwise}: not exported. "
                "Quantize without group_size (per_channel=True) to export, or keep that layer "
                "per channel with a scope"
            )
    return layers, quants


def check_exportable(qmodel: Any, weight_only: set[str] | None = None) -> None:
    """Raise :class:`ExportError` unless ``qmodel`` is a ptqkit quantized model whose grids have
    ONNX Runtime integer kernels (8-bit activations, weights of at most 8 bits)."""
    layers, quants = quantized_parts(
        qmodel, "its input is quantized (static activations): ONNX QDQ export writes one "
        "weight scale per output channel there, and only weight-only Linears (float input) "
        "are written group-wise (MatMulNBits / DequantizeLinear block_size)", dynamic=True,
        weight_only=weight_only,
    )
    for name, q in quants.items():
        if q.mode == "quant" and q.spec.bits != 8 and not q.spec.dynamic:
            raise ExportError(
                f"activation quantizer {name} ({q.label}) has {q.spec.bits} bits; ONNX QDQ "
                "export supports 8-bit activations only (ONNX Runtime has no integer kernels "
                "for other widths)"
            )
    for name, layer in layers.items():
        if layer.quantized and layer.spec.bits > 8:
            raise ExportError(
                f"layer {name} has {layer.spec.bits}-bit weights; ONNX QDQ export supports "
                "weights of at most 8 bits"
            )


def _check_path(path: Any) -> Path:
    return check_writable(path, ExportError)


def _shapes(args: tuple) -> str:
    shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
    return str(shapes[0]) if len(shapes) == 1 else str(shapes)


def _check_example(qmodel: nn.Module, example: Any) -> tuple:
    args = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise ExportError(
            "example_input must be a tensor or a tuple of tensors, got "
            + (type(example).__name__ if not args else str([type(a).__name__ for a in args]))
        )
    try:
        with torch.no_grad():
            qmodel(*args)
    except Exception as e:
        raise ExportError(
            f"the model rejects the example input of shape {_shapes(args)}: {_first_line(e)}"
        ) from None
    return args


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


# -- the TorchScript export ----------------------------------------------------------------------
def _names(given: list[str] | None, n: int, base: str) -> list[str]:
    if given is not None:
        if len(given) != n:
            raise ExportError(f"{base}_names has {len(given)} names for {n} {base}s")
        return list(given)
    return [base] if n == 1 else [f"{base}{i}" for i in range(n)]


def _torch_export(
    qmodel: nn.Module,
    args: tuple,
    opset: int,
    dynamic_batch: bool,
    input_names: list[str] | None,
    output_names: list[str] | None,
) -> onnx.ModelProto:
    with torch.no_grad():
        out = qmodel(*args)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    ins, outs = _names(input_names, len(args), "input"), _names(output_names, n_out, "output")
    axes = {n: {0: "batch"} for n in ins + outs} if dynamic_batch else None
    buf = io.BytesIO()
    with _captured_output() as log:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    qmodel,
                    args,
                    buf,  # type: ignore[arg-type]  # a file object: documented, stubs say path
                    dynamo=False,
                    opset_version=opset,
                    input_names=ins,
                    output_names=outs,
                    dynamic_axes=axes,
                    do_constant_folding=True,
                )
            error = None
        except Exception as e:
            error = e
    if error is not None:
        raise ExportError(_explain(error, log.text, opset, qmodel)) from None
    return onnx.load_from_string(buf.getvalue())


class _Log:
    text = ""


@contextlib.contextmanager
def _captured_output():
    """Capture what the exporter prints, Python and C++ alike (file descriptors 1 and 2): on
    failure it dumps its whole IR graph, which :func:`_explain` reads for the failing module."""
    log = _Log()
    with tempfile.TemporaryFile(mode="w+b") as f:
        saved = []
        try:
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            for fd, _ in saved:
                os.dup2(f.fileno(), fd)
        except (OSError, ValueError):  # no real descriptors (embedded interpreter): Python only
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            saved = []
        py = io.StringIO()
        try:
            with contextlib.redirect_stdout(py), contextlib.redirect_stderr(py):
                yield log
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            f.seek(0)
            log.text = py.getvalue() + f.read().decode(errors="replace")


def _fx_module(qmodel: nn.Module, op: str) -> str:
    """The module (qualified name and class) whose traced code calls the aten ``op``, found in
    the ``torch.fx`` graph of ``qmodel`` (``""`` if it is not a graph module or not found)."""
    graph = getattr(qmodel, "graph", None)
    base = op.split("::", 1)[-1].strip("_")
    for node in getattr(graph, "nodes", ()):
        if node.op not in ("call_function", "call_method"):
            continue
        name = getattr(node.target, "__name__", str(node.target)).strip("_")
        if name not in (base, base.split("_", 1)[-1]):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return f"node '{node.name}' of the model's forward"
        path, cls = list(stack.values())[-1]
        return f"module '{path}' ({getattr(cls, '__name__', cls)})"
    return ""


def _explain(e: Exception, log: str, opset: int, qmodel: nn.Module) -> str:
    """One line naming the op the TorchScript exporter failed on and where it is called: the
    module (from the fx graph, else from the exporter's scopes) or the source line."""
    msg = _first_line(e)
    if "Python operator" in msg or "PythonOp" in msg:
        return f"cannot export a custom autograd Function to ONNX (it has no symbolic): {msg}"
    op = re.search(r"'((?:aten|prim|quantized|onnx)::\w+)'", msg) or re.search(r"(aten::\w+)", msg)
    if op is None:
        return f"ONNX export failed: {msg}"
    where = _fx_module(qmodel, op.group(1))
    for line in log.splitlines() if not where else ():
        if f"{op.group(1)}(" not in line or "scope:" not in line:
            continue
        scope, _, source = line.split("scope:", 1)[1].partition("#")
        module = scope.strip().rsplit("::", 1)[-1] if "::" in scope else ""
        where = f"module '{module}'" if module else f"code at {source.strip()}"
        break
    inside = f" in {where}" if where else ""
    return f"ONNX export does not support op {op.group(1)}{inside} at opset {opset}: {msg}"


def _write(path: Path, data: bytes) -> None:
    write_bytes(path, data, ExportError)


__all__ = ["FORMATS", "check_exportable", "encodings_path", "export_onnx", "strip_qdq"]
