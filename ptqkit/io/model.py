""":func:`save` and :func:`load`: a quantized model to one file and back (see :mod:`ptqkit.io`)."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import PTQConfig
from ..errors import (
    ConfigError,
    LoadError,
    ModelError,
    PTQError,
    PTQWarning,
    SaveError,
    one_line,
)
from ..info import PTQInfo
from ..quant.modules import act_quants, quant_layers
from . import container, files, packing, replay, restore


def save(qmodel: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``qmodel`` (returned by :func:`ptqkit.quantize`) to ``path`` as one safetensors file.

    The write is atomic: the file is written under a temporary name in the same folder, then
    renamed over ``path``, so a crash never leaves a half-written file under ``path``.

    Raises:
        ModelError: ``qmodel`` is not a model returned by :func:`ptqkit.quantize`.
        SaveError: ``path`` cannot be written (a folder; its folder missing, not a folder or
            not writable; the file read-only; the disk full), naming ``path`` and the reason.
    """
    config = getattr(qmodel, "ptq_config", None)
    if not isinstance(qmodel, nn.Module) or not isinstance(config, PTQConfig):
        raise ModelError(
            f"save expects a model returned by ptqkit.quantize, got {type(qmodel).__name__}"
        )
    path = files.check_writable(path, SaveError)  # before any work
    layers = quant_layers(qmodel)
    quants = act_quants(qmodel)
    tensors = {k: v.detach().cpu() for k, v in qmodel.state_dict().items()}
    tensors.update(restore.float_reference(layers))
    info = getattr(qmodel, "ptq_info", None)
    layer_doc: dict[str, dict[str, Any]] = {
        n: {"spec": m.spec.to_dict(), "quantized": m.quantized} for n, m in layers.items()
    }
    packing.pack_layers(tensors, layers, layer_doc)  # 4 bits or fewer: two per byte
    doc = {
        "format": container.FORMAT,
        "format_version": container.FORMAT_VERSION,
        "ptqkit_version": container._version(),
        "torch_version": torch.__version__,
        "model_class": type(qmodel).__name__,
        "config": config.to_dict(),
        "layers": layer_doc,
        "quantizers": {
            n: {
                "label": q.label,
                "spec": q.spec.to_dict(),
                "mode": q.mode,
                "calibrated": q.calibrated,
            }
            for n, q in quants.items()
        },
        # without the wall-clock time of each stage: the same model, data and config must give
        # the same bytes
        "info": {**info.to_dict(), "stages": {}} if isinstance(info, PTQInfo) else {},
        "modules": replay.structural_modules(qmodel),
        "graph": replay.encode_graph(qmodel),
    }
    container.write(path, tensors, doc)


def _field(doc: dict[str, Any], key: str, path: Path) -> Any:
    if not isinstance(doc.get(key), dict):
        raise LoadError(f"{path}: the ptqkit metadata has no valid {key!r} entry")
    return doc[key]


def _mismatch(path: Path, what: str, file_names: set[str], model_names: set[str]) -> LoadError:
    missing = sorted(file_names - model_names)[:5]
    extra = sorted(model_names - file_names)[:5]
    return LoadError(
        f"{path}: the model does not match the file: {what} in the file but not in the model: "
        f"{missing or 'none'}; in the model but not in the file: {extra or 'none'}. Pass the "
        "same float architecture that was quantized"
    )


def _say_dtype(path: Path, extra: dict[str, torch.Tensor], layers: dict[str, Any]) -> None:
    """Warn when the saved model computes in another dtype than the architecture given."""
    saved = {str(t.dtype) for k, t in extra.items() if k.startswith(restore.FLOAT_WEIGHT)}
    arch = {str(m.weight_fp.dtype) for m in layers.values()}
    if saved and saved != arch:
        have, want = (", ".join(sorted(d.removeprefix("torch.") for d in x)) for x in (saved, arch))
        warnings.warn(
            f"{path}: the saved model computes in {have}, the architecture given in {want}: it "
            f"is loaded as saved ({have}); feed it {have} inputs, or convert it with .to(dtype)",
            PTQWarning,
            stacklevel=3,
        )


def load(path: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Load a quantized model saved by :func:`save`, onto the float architecture ``model``.

    ``model`` is an instance of the float network that was quantized (its weights do not matter:
    the file's integers, scales, biases and float reference replace them; ``model`` itself is not
    modified). ptqkit's prepare step rebuilds the quantized structure from it — the file stores
    data, never code, and a graph cannot be rebuilt from disk without executing code.

    Returns:
        A quantized model giving bit-identical outputs to the one saved (in float mode too),
        with ``ptq_config`` and ``ptq_info`` restored, in the saved model's dtypes: a model
        saved after ``.half()`` (``.double()``, bfloat16) loads as one, whatever the dtype of
        ``model`` (a :class:`~ptqkit.PTQWarning` says so when they differ).

    Raises:
        LoadError: the file is missing, truncated, corrupt, edited, of another format version or
            not a ptqkit file; a quantization parameter is invalid (a scale not finite and > 0, a
            zero point outside its grid, a shape the architecture does not have); or ``model``'s
            structure does not match it. The message names the entry or what differs.
    """
    from ..pipeline import attach

    path = Path(path)
    tensors, doc = container.read(path)
    config, layer_meta, quant_meta, saved_info = _metadata(path, tensors, doc)
    qmodel = _rebuild(path, model, config, saved_info)
    layers, quants = _matched_structure(path, qmodel, doc, tensors, layer_meta, quant_meta)

    extra = {k: v for k, v in tensors.items() if k.startswith(restore.PREFIXES)}
    # the modules' flags (quantized, mode) are in the metadata, which is what counts; a file
    # written before they were in the state dict has none
    state = {k: v for k, v in tensors.items() if k not in extra and not restore.is_flags(k)}
    _say_dtype(path, extra, layers)
    _restore_tensors(path, qmodel, (layers, layer_meta), (quants, quant_meta), state, extra)

    known = {f.name for f in dataclasses.fields(PTQInfo)}
    restored = PTQInfo(**{k: v for k, v in saved_info.items() if k in known})
    restored.config = config.to_dict()
    attach(qmodel, restored, config)
    return qmodel


def _metadata(
    path: Path, tensors: dict[str, torch.Tensor], doc: dict[str, Any]
) -> tuple[PTQConfig, dict[str, dict[str, Any]], dict[str, dict[str, Any]], dict[str, Any]]:
    """``(config, layers, quantizers, info)`` of the file's metadata, each checked present; the
    packed low-bit weights of ``tensors`` are unpacked in place."""
    try:
        config = PTQConfig.from_dict(_field(doc, "config", path))
    except ConfigError as e:
        raise LoadError(f"{path}: invalid config in the file: {e}") from None
    layer_meta: dict[str, dict[str, Any]] = _field(doc, "layers", path)
    packing.unpack_layers(path, tensors, layer_meta)
    quant_meta: dict[str, dict[str, Any]] = _field(doc, "quantizers", path)
    saved_info: dict[str, Any] = _field(doc, "info", path)
    return config, layer_meta, quant_meta, saved_info


def _rebuild(
    path: Path, model: nn.Module, config: PTQConfig, saved_info: dict[str, Any]
) -> nn.Module:
    """ptqkit's prepare step on ``model``, with the capture the file was made with."""
    from ..capture import prepare
    from ..capture.prepare import CAPTURES, zeros_like_specs
    from ..capture.verify import reference as run_reference

    info = PTQInfo(config=config.to_dict())
    capture = saved_info.get("capture") or None
    if capture is not None and capture not in CAPTURES:
        raise LoadError(f"{path}: unknown capture {capture!r} in the file")
    ref = None
    if capture == "export":  # torch.export runs the model: on zeros laid out as the example was
        example = zeros_like_specs(saved_info.get("capture_inputs") or {})
        if example is None:
            raise LoadError(f"{path}: the file has no input description to re-run torch.export")
        ref = run_reference(model, *example)
    try:
        with warnings.catch_warnings():  # the quantize run already warned about these
            warnings.simplefilter("ignore")
            return prepare(model, config.replace(progress=False), info, ref, capture=capture)
    except PTQError as e:
        raise LoadError(f"{path}: cannot rebuild the quantized structure on this model: {e}") from e


def _matched_structure(
    path: Path,
    qmodel: nn.Module,
    doc: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    layer_meta: dict[str, Any],
    quant_meta: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rebuilt model's quantized layers and activation quantizers, once its structural
    modules are replayed from the file; each set must be the file's (else a LoadError)."""
    layers = quant_layers(qmodel)
    if set(layers) != set(layer_meta):
        raise _mismatch(path, "quantized layers", set(layer_meta), set(layers))
    replay.replay_structure(path, qmodel, doc, tensors)
    layers, quants = quant_layers(qmodel), act_quants(qmodel)
    if set(quants) != set(quant_meta):
        raise _mismatch(path, "activation quantizers", set(quant_meta), set(quants))
    return layers, quants


def _restore_tensors(
    path: Path,
    qmodel: nn.Module,
    layers: tuple[dict[str, Any], dict[str, Any]],
    quants: tuple[dict[str, Any], dict[str, Any]],
    state: dict[str, torch.Tensor],
    extra: dict[str, torch.Tensor],
) -> None:
    """The file's tensors into ``qmodel``: ``layers``/``quants`` are ``(modules, metadata)``,
    ``extra`` the float references and biases (consumed: one left over is a LoadError)."""
    (modules, layer_meta), (quantizers, quant_meta) = layers, quants
    restore.install_biases(path, modules, extra)
    expected = {k for k in qmodel.state_dict() if not restore.is_flags(k)}
    if set(state) != expected:
        raise _mismatch(path, "tensors", set(state), expected)
    try:
        restore.restore_layers(path, modules, layer_meta, state, extra)
        restore.take_biases(path, modules, state)
        restore.restore_quantizers(path, quantizers, quant_meta, state)
    except (ConfigError, KeyError, TypeError, ValueError, IndexError) as e:
        if isinstance(e, LoadError):
            raise
        raise LoadError(f"{path}: invalid layer or quantizer metadata: {e}") from None
    if extra:
        raise _mismatch(path, "float-reference tensors", set(extra), set())
    restore.match_dtypes(qmodel, state)
    try:  # the rest (float biases, parameters of float modules) by the usual checked copy
        qmodel.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise LoadError(f"{path}: the model does not match the file: {one_line(e)}") from None
    restore.check_structural(path, qmodel)
    for layer in modules.values():  # the file carried the float reference of every layer
        layer.float_stale = False
