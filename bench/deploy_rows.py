"""``bench_pt2.py``'s rows on the runtimes PyTorch models are deployed with, each row in its own
process like the others: OpenVINO (FP32 pinned to f32, ptqkit's ONNX file, NNCF's own int8 model)
and ExecuTorch's XNNPACK delegate (ptqkit's ``.pte``, torchao/ExecuTorch ``XNNPACKQuantizer``).

* ``fp32_ov``: the FP32 ONNX file (``bench_export.export_fp32``: TorchScript exporter, opset 17,
  dynamic batch) compiled by OpenVINO's CPU plugin with ``INFERENCE_PRECISION_HINT=f32`` (on
  CPUs with AVX-512 BF16 / AMX it runs float models in bf16 otherwise: 94.9% top-1 agreement
  with PyTorch FP32 here, issue 26).
* ``ptqkit_ov``: ``export_onnx(qmodel, …, target="openvino")`` (int8 weights on every CPU) on
  the same plugin, float parts pinned to f32 (:class:`ptqkit.export.openvino.OvModule`).
* ``nncf_ov``: NNCF's basic post-training flow on the same FP32 ONNX file, as its docs call it:
  ``ov.Core().read_model`` → ``nncf.quantize(model, nncf.Dataset(crops))`` with its defaults
  (preset performance, ``subset_size`` 300 ≥ the calibration crops, fast bias correction), one
  crop per data item, saved without fp16 weight compression and compiled with the f32 hint.
* ``ptqkit_pte``: ``export_pte(qmodel, x)`` (:mod:`ptqkit.export.executorch`), one static-shape
  program per batch size (ExecuTorch plans memory for a bound, see its docstring).
* ``xnnpack_pt2e``: ExecuTorch's XNNPACK quantization flow as its docs write it:
  ``torch.export`` → ``prepare_pt2e(XNNPACKQuantizer(get_symmetric_quantization_config(
  is_per_channel=True)))`` → calibration on the same crops → ``convert_pt2e`` →
  ``torch.export`` per batch size → ``to_edge_transform_and_lower(XnnpackPartitioner)`` →
  ``to_executorch`` (the same lowering ``export_pte`` uses).

Integer kernels: OpenVINO's execution graph of the compiled model (each conv/linear node's
``runtimePrecision``: ``u8``/``i8`` is an integer kernel; :meth:`OvModule.precisions`); for
ExecuTorch, the XNNPACK graphs the delegate serialized (qs8 conv / fully-connected nodes: int8
input and int8 weights) and ExecuTorch's delegated-node count
(:class:`ptqkit.export.executorch.Delegation`).

A row whose package is missing raises ``ImportError`` here, which ``bench_pt2.run_row`` reports
as "not installed: … (pip install …)". :data:`RUNTIME` names the interpreter option
(``--python-ov`` / ``--python-et``) a row runs under when its package lives in another venv.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ptqkit

Fns = dict[int, Callable[[torch.Tensor], torch.Tensor]]
Built = tuple[Fns, dict[str, Any]]

ROWS = {
    "fp32_ov": "FP32 OpenVINO (INFERENCE_PRECISION_HINT f32)",
    "ptqkit_ov": "ptqkit export_onnx(target='openvino') → OpenVINO (f32 hint)",
    "nncf_ov": "NNCF nncf.quantize → OpenVINO (f32 hint)",
    "ptqkit_pte": "ptqkit export_pte → ExecuTorch XNNPACK",
    "xnnpack_pt2e": "XNNPACKQuantizer pt2e → ExecuTorch XNNPACK",
}
#: which interpreter option a row runs under (``bench_pt2.py --python-ov / --python-et``)
RUNTIME = {
    "fp32_ov": "ov",
    "ptqkit_ov": "ov",
    "nncf_ov": "ov",
    "ptqkit_pte": "et",
    "xnnpack_pt2e": "et",
}
#: the pip package of each importable a row needs (the "not installed" message)
PIP = {"openvino": "openvino", "nncf": "nncf", "executorch": "executorch", "torchao": "torchao"}
#: modules whose versions a row records, when it imported them
VERSIONED = ("openvino", "nncf", "executorch", "torchao")


@dataclasses.dataclass(frozen=True)
class Ctx:
    """What every row builder reads: the work folder (``model.ptq.safetensors``), the FP32 model,
    the calibration batches, one evaluation tensor per batch size, the FP32 model's conv/linear
    count and the intra-op threads."""

    work: Path
    model: nn.Module
    calib: list[torch.Tensor]
    xs: dict[int, torch.Tensor]
    layers: int
    threads: int

    def qmodel(self) -> nn.Module:
        return ptqkit.load(self.work / "model.ptq.safetensors", self.model)


# -- OpenVINO ----------------------------------------------------------------------------------
def _fp32_onnx(ctx: Ctx, name: str) -> Path:
    from bench_export import export_fp32

    return export_fp32(ctx.model, ctx.work / f"{name}.fp32.onnx", ctx.xs[1])


def _ov(ctx: Ctx, path: Path) -> Built:
    """``path`` compiled by OpenVINO (f32 hint, ``ctx.threads``, latency hint) for every batch
    size (the model has a dynamic batch), and its conv/linear precisions."""
    import openvino  # noqa: F401  (ImportError: the row says "not installed")

    from ptqkit.export.openvino import OvModule

    ov = OvModule(path, precision="f32", threads=ctx.threads, latency=True)
    prec = ov.precisions()
    kinds = collections.Counter(f"{x.layer_type} {x.precision}" for x in prec.layers)
    kernels = {
        "int8": prec.int8,
        "float": len(prec.layers) - prec.int8,
        "layers": ctx.layers,
        "kernels": dict(kinds),
        "note": f"{len(prec.layers)} conv/linear nodes in the execution graph; float parts in "
        f"{prec.inference_precision}",
    }
    return {b: ov for b in ctx.xs}, kernels


def fp32_ov(ctx: Ctx) -> Built:
    import openvino  # noqa: F401

    return _ov(ctx, _fp32_onnx(ctx, "fp32_ov"))


def ptqkit_ov(ctx: Ctx) -> Built:
    import openvino  # noqa: F401

    from ptqkit.export import export_onnx

    path = export_onnx(
        ctx.qmodel(), ctx.work / "ptqkit.openvino.onnx", ctx.xs[1], target="openvino"
    )
    return _ov(ctx, Path(path))


def nncf_ov(ctx: Ctx) -> Built:
    """NNCF's basic quantization flow for an OpenVINO model, with its defaults."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(_fp32_onnx(ctx, "nncf_ov")))
    crops = [x[None].numpy() for batch in ctx.calib for x in batch]
    quantized = nncf.quantize(model, nncf.Dataset(crops))
    path = ctx.work / "nncf.int8.xml"
    ov.save_model(quantized, str(path), compress_to_fp16=False)
    return _ov(ctx, path)


# -- ExecuTorch / XNNPACK ----------------------------------------------------------------------
def _et_threads(threads: int) -> int | None:
    """Set ExecuTorch's XNNPACK threadpool to ``threads`` where its Python bindings expose the
    reset; the count in effect, or ``None`` when they do not say."""
    try:
        from executorch.extension.pybindings import portable_lib
    except ImportError:
        return None
    reset = getattr(portable_lib, "_unsafe_reset_threadpool", None)
    if reset is not None:
        reset(threads)
    count = getattr(portable_lib, "_threadpool_get_thread_count", None)
    return int(count()) if count is not None else (threads if reset is not None else None)


def _pte_kernels(delegation: Any, ctx: Ctx, threads: int | None) -> dict[str, Any]:
    d = delegation
    outside = d.outside_layers
    return {
        "int8": d.int8_layers if d.int8_layers is not None else 0,
        "float": (d.float_layers or 0) + (outside or 0),
        "layers": d.layers or ctx.layers,
        "kernels": {},
        "note": f"{d.delegated_nodes} nodes delegated to XNNPACK in {d.partitions} partitions, "
        f"{d.other_nodes} not; {d.float_layers} conv/linear fp32 in XNNPACK, {outside} outside "
        f"the delegate; threadpool {threads if threads is not None else '?'} threads",
    }


def ptqkit_pte(ctx: Ctx) -> Built:
    import executorch.runtime  # noqa: F401

    from ptqkit.export.executorch import export_pte

    threads = _et_threads(ctx.threads)
    qmodel = ctx.qmodel()
    ptes = {b: export_pte(qmodel, x) for b, x in ctx.xs.items()}
    return dict(ptes), _pte_kernels(ptes[max(ptes)].delegation, ctx, threads)


def xnnpack_pt2e(ctx: Ctx) -> Built:
    """ExecuTorch's XNNPACK quantization flow (its docs), lowered as ``export_pte`` lowers."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from ptqkit.export.executorch import PteModule, _lower

    threads = _et_threads(ctx.threads)
    batch = torch.export.Dim("batch", min=1)
    example = (torch.cat([ctx.xs[1], ctx.xs[1]]),)  # a batch of 2: export specializes size 1
    with torch.no_grad():
        graph = torch.export.export(ctx.model, example, dynamic_shapes=({0: batch},)).module()
        quantizer = XNNPACKQuantizer().set_global(
            get_symmetric_quantization_config(is_per_channel=True)
        )
        prepared = prepare_pt2e(graph, quantizer)
        for b in ctx.calib:
            prepared(b)
        converted = convert_pt2e(prepared)
        lowered = {b: _lower(torch.export.export(converted, (x,))) for b, x in ctx.xs.items()}
    ptes = {b: PteModule(data, d) for b, (data, d) in lowered.items()}
    return dict(ptes), _pte_kernels(lowered[max(lowered)][1], ctx, threads)


BUILDERS: dict[str, Callable[[Ctx], Built]] = {
    "fp32_ov": fp32_ov,
    "ptqkit_ov": ptqkit_ov,
    "nncf_ov": nncf_ov,
    "ptqkit_pte": ptqkit_pte,
    "xnnpack_pt2e": xnnpack_pt2e,
}


def versions() -> dict[str, str]:
    """Versions of the optional packages this process imported (for the table's footnote), as
    their distributions record them (``executorch`` has no ``__version__``)."""
    import sys
    from importlib import metadata

    out = {}
    for name in VERSIONED:
        if sys.modules.get(name) is not None:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                out[name] = str(getattr(sys.modules[name], "__version__", "?"))
    return out


def row_error(e: Exception) -> str:
    """A row's one-line error: for a missing package, "not installed: no module … (pip install
    …)" naming its pip package; otherwise the exception's type and first 300 characters."""
    name = getattr(e, "name", None) or ""
    if isinstance(e, ImportError) and name.split(".")[0] in PIP:
        return f"not installed: no module {name!r} (pip install {PIP[name.split('.')[0]]})"
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
