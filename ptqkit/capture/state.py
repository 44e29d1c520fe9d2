"""The user's state in the copy being quantized: every forward ptqkit runs starts from it.

A model whose ``forward`` changes its own state (``self.calls += 1`` on a buffer, a running
mean ``self.running.mul_(0.9).add_(...)``, ``self.cache = h``) is captured with hooks, which keep
its forward (:mod:`.verify`). The capture check, the calibration pass and every later stage
(auto ranges, AdaRound, bias correction, fallback) run that forward on the copy; without care the
copy comes back with its state advanced by those passes (``calls = 5`` where the user's model
has 0) and computes something else than the float model it approximates.

:class:`StateRestore` records, when the copy is made, every buffer and plain attribute (a tensor,
a number, a string, ``None`` or a list/tuple/dict of those) of the user's modules, and puts back
whatever a forward changed before the next top-level forward and once more when the quantized
model is handed back (:func:`release`). ptqkit's own modules (quantizers, wrapped-layer
weights/biases, CLE's BatchNorm statistics) are not the user's state and are left alone.

A tensor is compared by identity and in-place version counter (``t._version``: no read of its
data), anything else by value, so an unchanged model costs a dictionary walk per forward.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

#: attributes of a wrapped layer that ptqkit manages (QuantLayer, BN folding, CLE)
_MANAGED = frozenset({"weight", "bias", "bn_mean", "bn_std"})
_SCALARS = (int, float, complex, bool, str, bytes, type(None))


def _plain(v: Any) -> bool:
    """A value a forward may set and a snapshot can copy: tensors, numbers, strings and
    containers of them."""
    if isinstance(v, (torch.Tensor, *_SCALARS)):
        return not isinstance(v, nn.Parameter)
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, _SCALARS) and _plain(x) for k, x in v.items())
    return False


def _copy(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    return copy.deepcopy(v)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and bool(
                ((a == b) | (a.isnan() & b.isnan())).all()
                if a.is_floating_point()
                else torch.equal(a, b)
            )
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _own(m: nn.Module) -> bool:
    return type(m).__module__.startswith("ptqkit.")


def _entries(model: nn.Module) -> dict[tuple[str, str, str], Any]:
    """``(module path, kind, name) -> value`` for the user's state (kind ``buffer`` or
    ``attr``)."""
    out: dict[tuple[str, str, str], Any] = {}
    wrapped = {id(m.layer) for m in model.modules() if type(m).__name__ == "QuantLayer"}
    for path, m in model.named_modules():
        if _own(m):
            continue
        skip = _MANAGED if id(m) in wrapped else frozenset()
        for k, b in m._buffers.items():
            if k not in skip and b is not None:
                out[(path, "buffer", k)] = b
        for k, v in m.__dict__.items():
            if k.startswith("_") or k == "training" or k in skip or not _plain(v):
                continue
            out[(path, "attr", k)] = v
    return out


class StateRestore:
    """A forward pre-hook that puts the user's state back before each forward (see the module
    docstring). Keyed by module path, so a deep copy of the model (``tune``'s trials) carries an
    independent copy of the hook."""

    def __init__(self, model: nn.Module) -> None:
        entries = _entries(model)
        self.types = {path: type(m) for path, m in model.named_modules()}
        self.saved = {key: _copy(v) for key, v in entries.items()}
        self.stamps = {key: self._stamp(v) for key, v in entries.items()}
        self.restored = 0  # how many values were put back (a record for tests and reports)

    @staticmethod
    def _stamp(v: Any) -> Any:
        # the tensor itself (kept alive: its id cannot be reused) and its in-place version
        return (v, v._version) if isinstance(v, torch.Tensor) else None

    @staticmethod
    def _unchanged(now: Any, stamp: Any) -> bool:
        return stamp is not None and now is stamp[0] and now._version == stamp[1]

    def __deepcopy__(self, memo: dict[int, Any]) -> StateRestore:
        new = StateRestore.__new__(StateRestore)
        new.types = dict(self.types)
        new.saved = {k: _copy(v) for k, v in self.saved.items()}
        new.stamps = {k: None for k in self.saved}  # tensor ids differ in the copy
        new.restored = self.restored
        return new

    def restore(self, model: nn.Module) -> int:
        """Put back every recorded value that differs now; the count of those put back."""
        mods = dict(model.named_modules())
        n = 0
        for key, want in self.saved.items():
            path, kind, name = key
            m = mods.get(path)
            if m is None or type(m) is not self.types.get(path):
                continue  # replaced by one of ptqkit's modules (CLE's clamp, ...)
            table = m._buffers if kind == "buffer" else m.__dict__
            if name not in table:
                continue
            now = table[name]
            stamp = self.stamps[key]
            if now is want or self._unchanged(now, stamp):
                continue  # the same tensor, not written in place
            if _equal(now, want):
                self.stamps[key] = self._stamp(now)
                continue
            if kind == "buffer" and isinstance(now, torch.Tensor) and _equal_layout(now, want):
                with torch.no_grad():
                    now.copy_(want)
                fresh = now
            else:
                fresh = _copy(want)
                table[name] = fresh
            self.stamps[key] = self._stamp(fresh)
            n += 1
        self.restored += n
        return n

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.restore(module)


def _equal_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def hold(model: nn.Module) -> StateRestore:
    """Record the user's state of ``model`` (the copy being quantized) and put it back before
    each of its forwards until :func:`release`."""
    hook = StateRestore(model)
    model.register_forward_pre_hook(hook, prepend=True)
    return hook


def release(model: nn.Module) -> int:
    """Put the recorded state back a last time and remove the hook; the number of values put
    back over the whole run (0 when ``model`` holds none)."""
    total = 0
    for key, hook in list(model._forward_pre_hooks.items()):
        if isinstance(hook, StateRestore):
            hook.restore(model)
            total += hook.restored
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    return total
