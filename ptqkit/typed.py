"""Typed access to torch objects whose annotations are wider than what ptqkit relies on.

torch annotates ``nn.Module.__getattr__`` as returning ``Tensor | Module``, an ``fx.Node``'s
``target`` as ``Callable | str`` and its ``args`` as any ``fx.node.Argument``. Where ptqkit knows
more (a layer's ``weight`` is a tensor, the target of a ``call_module`` node is a qualified
name, the input of a quantizer node is a node), these accessors state it to the type checker and
check it at run time: a model that breaks the assumption raises :class:`ModelError` naming the
module or node, instead of an ``AttributeError`` from deep inside a stage.

Low level: imports only torch and :mod:`ptqkit.errors`.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .errors import ModelError


def tensor_attr(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>``, which must be a tensor (a parameter or a buffer)."""
    value = getattr(module, name, None)
    if not isinstance(value, torch.Tensor):
        raise ModelError(
            f"{type(module).__name__}.{name} is {type(value).__name__}, expected a tensor"
        )
    return value


def optional_tensor_attr(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>`` when it is a tensor, ``None`` when absent or ``None`` (a layer built
    with ``bias=False``)."""
    value = getattr(module, name, None)
    if value is not None and not isinstance(value, torch.Tensor):
        raise ModelError(
            f"{type(module).__name__}.{name} is {type(value).__name__}, expected a tensor or None"
        )
    return value


def target_name(node: fx.Node) -> str:
    """The qualified name a ``call_module`` / ``get_attr`` node refers to (or the method name
    of a ``call_method`` node)."""
    if not isinstance(node.target, str):
        raise ModelError(f"graph node {node.name} ({node.op}) has no name target: {node.target!r}")
    return node.target


def submodule(gm: nn.Module, node: fx.Node) -> nn.Module:
    """The module a ``call_module`` node calls."""
    return gm.get_submodule(target_name(node))


def input_node(node: fx.Node, i: int = 0) -> fx.Node:
    """Positional argument ``i`` of ``node``, which must be another node (not a constant)."""
    arg = node.args[i] if len(node.args) > i else None
    if not isinstance(arg, fx.Node):
        raise ModelError(f"graph node {node.name}: argument {i} is not the output of a node")
    return arg
