"""Models ptqkit refuses up front, with what to pass instead, and parametrized layers.

* A TorchScript module (``torch.jit.script`` / ``torch.jit.trace``): its ``forward`` is compiled
  code that neither ``torch.fx`` nor a deep copy with wrapped layers can rewrite.
* A model with tensors on the ``meta`` device: it has shapes but no weights to quantize.
* An already-quantized model (it holds ``QuantLayer`` / ``ActQuant`` modules): quantizing it again
  would nest quantizers and quantize integer weights a second time.

Parametrized layers (``torch.nn.utils.parametrize.register_parametrization``,
``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm``, and the older hook-based
``torch.nn.utils.weight_norm``) compute their weight from other tensors at every call. On the
copy, the parametrization is replaced by the weight it computes
(``remove_parametrizations(..., leave_parametrized=True)``), which is what gets quantized.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ModelError
from ..quant.modules import TRANSPOSED_LAYERS, ActQuant, QuantLayer


def refuse(model: nn.Module) -> None:
    """Raise :class:`ModelError` for a model that cannot be quantized as given."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError(
            f"{type(model).__name__} is a TorchScript module (torch.jit.script / torch.jit.trace); "
            "ptqkit rewrites Python modules: pass the original nn.Module it was scripted from"
        )
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise ModelError(
                f"{name} is on the 'meta' device (shapes without values): load the weights first, "
                "e.g. model.to_empty(device='cpu') then model.load_state_dict(state), or "
                "load_state_dict(state, assign=True)"
            )
    from torch.nn.utils.weight_norm import WeightNorm

    for name, m in model.named_modules():
        old_norm = [h for h in m._forward_pre_hooks.values() if isinstance(h, WeightNorm)]
        if old_norm and not _copyable(m):
            raise ModelError(
                f"{name} uses the deprecated torch.nn.utils.weight_norm, which cannot be copied: "
                "use torch.nn.utils.parametrizations.weight_norm, or call "
                f"torch.nn.utils.remove_weight_norm on {name} before quantizing"
            )
        if isinstance(m, (QuantLayer, ActQuant)):
            raise ModelError(
                f"the model is already quantized ({name or 'the model'} is a "
                f"{type(m).__name__}): pass the float model it was made from"
            )


def _copyable(m: nn.Module) -> bool:
    import copy

    try:
        copy.deepcopy(m)
    except Exception:
        return False
    return True


def unparametrize(model: nn.Module) -> list[str]:
    """Replace every parametrization of ``model`` (a copy) by the tensor it computes; returns
    ``"module.tensor (Parametrization, ...)"`` for each one removed."""
    from torch.nn.utils.weight_norm import WeightNorm

    done = []
    for name, m in list(model.named_modules()):
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, WeightNorm):  # torch.nn.utils.weight_norm (deprecated API)
                try:
                    torch.nn.utils.remove_weight_norm(m, hook.name)
                except Exception as e:
                    raise ModelError(
                        f"{name}: cannot replace its weight_norm by the weight it computes: {e}"
                    ) from e
                done.append(f"{name}.{hook.name} (weight_norm)")
        if not parametrize.is_parametrized(m):
            continue
        # a deep copy shares the dynamically made ``Parametrized<Layer>`` class with the user's
        # module, and removing a parametrization deletes its property from that class: give the
        # copy a class of its own first, so the user's model keeps working
        cls = type(m)
        body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        m.__class__ = type(cls.__name__, cls.__bases__, body)
        for tensor in list(m.parametrizations.keys()):
            kinds = ", ".join(type(p).__name__ for p in m.parametrizations[tensor])
            try:
                parametrize.remove_parametrizations(m, tensor, leave_parametrized=True)
            except Exception as e:
                raise ModelError(
                    f"{name}.{tensor} is parametrized ({kinds}) and the parametrization cannot be "
                    f"replaced by the tensor it computes: {e}"
                ) from e
            done.append(f"{name}.{tensor} ({kinds})")
    return done


def refuse_stages(qmodel: nn.Module, config: Any) -> None:
    """Raise :class:`ModelError` when ``config`` asks for a stage that cannot handle a quantized
    layer of ``qmodel``: CLE and AdaRound assume the ``[out, in, k...]`` weight layout, which a
    transposed conv (``[in, out/groups, k...]``) does not have."""
    transposed = [
        n for n, m in qmodel.named_modules()
        if isinstance(m, QuantLayer) and isinstance(m.layer, TRANSPOSED_LAYERS)
    ]
    stages = [s for s, on in (("cle", config.cle), ("adaround", config.adaround)) if on]
    if transposed and stages:
        raise ModelError(
            f"{' and '.join(stages)} {'does' if len(stages) == 1 else 'do'} not support "
            f"ConvTranspose layers ({', '.join(transposed[:5])}): set "
            f"{'=False, '.join(stages)}=False, or leave those layers float with "
            f"skip={tuple(transposed[:5])!r}"
        )
