"""The bytes of a ptqkit file: a safetensors container written in one canonical form and signed
by one SHA-256 digest over everything that decides the computation.

Layout (the safetensors format): 8 bytes little-endian header length ``n``, ``n`` bytes of JSON
header, then the tensor data. The header maps each tensor name to ``{"dtype", "shape",
"data_offsets"}`` and holds ``"__metadata__": {"ptqkit": <document>}``, the JSON document of
:mod:`ptqkit.io` (config, specs, graph, modules, ...). Any safetensors reader can open the file.

**Canonical form.** ptqkit writes the header itself, in exactly one way: compact JSON
(``separators=(",", ":")``, ASCII), ``__metadata__`` first, then the tensors by decreasing
element size and name (so every tensor starts at a multiple of its element size), offsets
contiguous from 0, padded with spaces to a multiple of 8 bytes; the document inside is
``json.dumps(doc, sort_keys=True)``. On load the header is rebuilt from what it parsed to and must
equal the bytes read, and the data must end where the file ends.

**Digest.** The document's ``sha256`` is ``SHA-256("ptqkit/2\\0" ‖ canonical document without
its sha256 ‖ "\\0" ‖ for each tensor by name: name|dtype|shape| ‖ bytes)``.

Together they make every byte count: a change to the length prefix or to the header either stops
it from parsing, or gives a header whose canonical form is other bytes (whitespace, key order,
padding, offsets), or gives another content (a graph constant, a scale, a tensor's name, dtype or
shape, the digest itself), which the digest detects; a change to the tensor data changes the
digest. Each is a :class:`~ptqkit.LoadError`. The digest detects corruption and edits; it is not
a signature (whoever edits the file can recompute it), which is why :func:`ptqkit.load` also
validates every quantization parameter and the graph.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch

from ..errors import LoadError, SaveError
from .files import atomic_write

FORMAT = "ptqkit.quantized"
#: 2: header digest, canonical header, float reference (format 1 digested the tensors only)
FORMAT_VERSION = 2
#: the safetensors metadata entry holding ptqkit's JSON document
METADATA_KEY = "ptqkit"
#: headers larger than this are refused before parsing (a corrupt length prefix)
MAX_HEADER = 256 * 2**20

_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES = {code: dt for dt, code in _CODES.items()}
_SIZES = {code: torch.empty((), dtype=dt).element_size() for dt, code in _CODES.items()}


def _version() -> str:
    from .. import __version__

    return __version__


def canonical(doc: Any) -> str:
    """The one JSON text of ``doc`` that a file may hold."""
    return json.dumps(doc, sort_keys=True)


def _raw(t: torch.Tensor) -> Any:
    """The bytes of ``t`` (little-endian, C order) as a buffer, without a copy when contiguous."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


def digest(doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of ``doc`` (without its ``sha256`` entry) and of every tensor (module docstring)."""
    h = hashlib.sha256(b"ptqkit/2\0")
    h.update(canonical({k: v for k, v in doc.items() if k != "sha256"}).encode())
    h.update(b"\0")
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(_raw(t))
    return h.hexdigest()


def _header(text: str, entries: list[tuple[str, str, list[int], int]]) -> bytes:
    """The canonical header for the document ``text`` and ``(name, dtype, shape, nbytes)``
    entries already in canonical order."""
    header: dict[str, Any] = {"__metadata__": {METADATA_KEY: text}}
    offset = 0
    for name, code, shape, nbytes in entries:
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def _order(entries: list[tuple[str, str, list[int], int]]) -> list[tuple[str, str, list[int], int]]:
    return sorted(entries, key=lambda e: (-_SIZES[e[1]], e[0]))


# -- write ---------------------------------------------------------------------------------------
def sign(doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``doc`` as it will read back (JSON-normalized: string keys, lists), with its digest."""
    doc = json.loads(json.dumps({k: v for k, v in doc.items() if k != "sha256"}, default=str))
    doc["sha256"] = digest(doc, tensors)
    return doc


def write(path: Path, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> None:
    """Sign ``doc`` and write it with ``tensors`` to ``path`` atomically (:mod:`.files`: a
    temporary file in the same folder, flushed to disk, then renamed over ``path``)."""
    for name, t in tensors.items():
        if t.dtype not in _CODES:
            raise SaveError(f"cannot save {name}: dtype {t.dtype} has no safetensors code here")
        if name == "__metadata__":
            raise SaveError("a tensor may not be named __metadata__")
    text = canonical(sign(doc, tensors))
    entries = _order(
        [
            (n, _CODES[t.dtype], list(t.shape), t.numel() * t.element_size())
            for n, t in tensors.items()
        ]
    )
    head = _header(text, entries)
    with atomic_write(path, "wb", SaveError) as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for e in entries:
            t = tensors[e[0]]
            if t.numel():
                f.write(_raw(t))


# -- read ----------------------------------------------------------------------------------------
def _unreadable(path: Path, why: str) -> LoadError:
    return LoadError(
        f"{path}: not a readable ptqkit file (truncated, corrupt or another format): {why}"
    )


def _entries(path: Path, header: dict[str, Any]) -> list[tuple[str, str, list[int], int]]:
    out = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(e, dict) and e.get("dtype") in _SIZES and isinstance(e.get("shape"), list)
        offsets = e.get("data_offsets") if ok else None
        if not (ok and isinstance(offsets, list) and len(offsets) == 2):
            raise _unreadable(path, f"bad header entry for tensor {name!r}")
        if not all(isinstance(v, int) and v >= 0 for v in [*e["shape"], *offsets]):
            raise _unreadable(path, f"bad shape or offsets for tensor {name!r}")
        nbytes = offsets[1] - offsets[0]
        numel = 1
        for d in e["shape"]:
            numel *= d
        if nbytes != numel * _SIZES[e["dtype"]]:
            raise _unreadable(path, f"tensor {name!r}: its offsets do not match its shape")
        out.append((name, e["dtype"], e["shape"], nbytes))
    return out


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the document of a ptqkit file, with the form, version and digest checked.

    Raises:
        LoadError: missing, truncated, corrupt, edited, foreign or newer file (says which).
    """
    if not path.is_file():
        raise LoadError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _unreadable(path, f"{size} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(size - 8, MAX_HEADER):
            raise _unreadable(path, f"header length {n} does not fit the file ({size} bytes)")
        raw = f.read(n)
        doc, entries = _parse(path, raw)
        data = bytearray(f.read())
    if 8 + n + len(data) != size or len(data) != sum(e[3] for e in entries):
        raise _unreadable(
            path,
            f"the tensor data takes {sum(e[3] for e in entries)} bytes but the file has "
            f"{size - 8 - n} after the header",
        )
    tensors = _tensors(data, _order(entries))
    if doc.get("sha256") != digest(doc, tensors):
        raise LoadError(
            f"{path}: the header or tensor data does not match the file's checksum (sha256): "
            "the file is corrupt or was edited"
        )
    return tensors, doc


def _parse(path: Path, raw: bytes) -> tuple[dict[str, Any], list[tuple[str, str, list[int], int]]]:
    """The document and tensor entries of the header bytes ``raw``, in canonical form."""
    try:
        header = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise _unreadable(path, f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _unreadable(path, "the header is not a JSON object")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not isinstance(meta.get(METADATA_KEY), str):
        raise LoadError(
            f"{path}: not a ptqkit quantized model (a safetensors file without ptqkit "
            "metadata); save one with ptqkit.save"
        )
    text = meta[METADATA_KEY]
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise LoadError(
            f"{path}: the ptqkit metadata is not valid JSON (corrupt file): {e}"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise LoadError(f"{path}: not a ptqkit quantized model (unknown metadata format)")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise LoadError(
            f"{path}: format version {version!r} is newer than this ptqkit "
            f"({_version()}, format {FORMAT_VERSION}) can read; upgrade ptqkit"
        )
    if version < FORMAT_VERSION:
        raise LoadError(
            f"{path}: format version {version} (an older ptqkit) has no digest over its header "
            "and no float reference; quantize the model again and save it with this ptqkit"
        )
    entries = _entries(path, header)
    if (
        set(meta) != {METADATA_KEY}
        or text != canonical(doc)
        or _header(text, _order(entries)) != raw
    ):
        raise LoadError(
            f"{path}: the header is not in the one form ptqkit writes: the file was edited or "
            "corrupted (a changed byte, key order or spacing)"
        )
    return doc, entries


def _tensors(
    data: bytearray, entries: list[tuple[str, str, list[int], int]]
) -> dict[str, torch.Tensor]:
    """The tensors of the data section (entries in canonical order: contiguous, and each
    aligned to its element size), viewing ``data`` without a copy."""
    out, offset = {}, 0
    for name, code, shape, nbytes in entries:
        dtype = _DTYPES[code]
        if nbytes:
            t = torch.frombuffer(data, dtype=dtype, count=nbytes // _SIZES[code], offset=offset)
        else:
            t = torch.empty(0, dtype=dtype)
        out[name] = t.reshape(shape)
        offset += nbytes
    return out
