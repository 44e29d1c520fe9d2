"""Capture with ``torch.export`` (non-strict): for models ``torch.fx`` cannot trace because their
``forward`` branches on a Python value (``forward(self, x, flag=False)``), reads a tensor's shape,
calls into code fx cannot symbolically run, ...

``torch.export.export(model, args, kwargs, strict=False)`` runs the model once on the example
batch and records the ATen ops it executed, specialised to that call's Python values (the
branches taken, ``flag=False``) with every tensor dimension left dynamic (``Dim.AUTO``: batch
size, sequence length) unless the model's code pins it. The ATen graph
(``ExportedProgram.module()``) is then lifted back to ``nn`` modules and ``torch`` functions by
:func:`.aten.lift_aten` (the same code path the CLI uses for ``.pt2`` files), so that BatchNorm
folding and the placement rules (quantizers after ReLU/ReLU6/clamp, on adds, cats and matmuls)
apply as for a ``torch.fx`` trace. A graph that keeps ATen ops the lifting does not map
(``layer_norm``, ``softmax``, ``gelu``, ``embedding``: transformers) is not used: the
placement rules, SmoothQuant and the reports do not know them, and the hook capture serves such
models better. The equivalence check of :mod:`.verify` then confirms that the lifted graph
computes what the model computes.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import fx, nn

from .aten import lift_aten

#: shape bookkeeping of a graph with dynamic dimensions: no computation to place quantizers on
SHAPE_OPS = {
    torch.ops.aten.sym_size.int,
    torch.ops.aten.sym_numel.default,
    torch.ops.aten.sym_stride.int,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}


def _dynamic_batch(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``dynamic_shapes`` by parameter name: every dimension of every tensor input
    ``Dim.AUTO`` (dynamic unless the model's code fixes it: batches of another size or sequence
    length must run through the same graph)."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    return {
        k: {d: torch.export.Dim.AUTO for d in range(v.dim())}
        if isinstance(v, torch.Tensor) and v.dim() > 0
        else None
        for k, v in bound.items()
    }


def export_capture(
    model: nn.Module, args: tuple, kwargs: dict
) -> tuple[fx.GraphModule | None, str]:
    """``(graph module, "")`` or ``(None, reason)``; ``model`` is copied, never run itself."""
    try:
        root = copy.deepcopy(model).eval()
        try:
            dynamic = _dynamic_batch(root, args, kwargs)
            ep = torch.export.export(root, args, kwargs, strict=False, dynamic_shapes=dynamic)
        except Exception:  # a model that needs a static batch: export it as it is
            ep = torch.export.export(root, args, kwargs, strict=False)
        gm = lift_aten(ep.module())
    except Exception as e:  # any failure of the exporter means "not capturable this way"
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        return None, reason[:300]
    left = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if isinstance(node.target, torch._ops.OpOverload) and node.target not in SHAPE_OPS:
            left.add(str(node.target.overloadpacket.__name__))
    if left:
        return None, (
            f"its ATen graph keeps ops ptqkit does not map back ({', '.join(sorted(left)[:5])}): "
            "placement, SmoothQuant and the report would not recognise them"
        )
    return gm, ""
