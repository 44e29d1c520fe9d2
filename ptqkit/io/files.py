"""Every file ptqkit writes goes through here: one check of the path, one atomic write, one error.

:func:`atomic_write` writes under a temporary name in the target's folder (``.name.XXXX.tmp``),
flushes it to disk, gives it the permissions a new file gets (``0o666 & ~umask``: ``mkstemp``
makes it private) and renames it over the target (``os.replace``), so a crash never leaves a
half-written file under the user's name. Whatever fails — the path is a folder, its folder is
missing or not a folder or cannot be written, the file is read-only, the disk is full — the
caller's error class (:class:`~ptqkit.SaveError` by default, :class:`~ptqkit.ExportError` for
ONNX export) is raised with the *user's* path and the reason, never the temporary file's name
in a raw ``FileNotFoundError``/``PermissionError``. Used by :func:`ptqkit.save`,
:func:`ptqkit.export_onnx`, :func:`ptqkit.write_report`, :func:`ptqkit.run_job` (its
``summary.json``) and the command line.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import PTQError, SaveError


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def check_writable(path: Any, error: type[PTQError] = SaveError) -> Path:
    """``path`` as a :class:`~pathlib.Path` that a file can be written to, or ``error`` saying
    why not (checked before any work, by a probe file in its folder)."""
    try:
        p = Path(path)
    except TypeError:
        raise error(f"path must be a str or os.PathLike, got {type(path).__name__}") from None
    if p.is_dir():
        raise error(f"cannot write {p}: it is a folder; give the path of the file to write")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise error(f"cannot write {p}: folder {parent} does not exist")
    if not parent.is_dir():
        raise error(f"cannot write {p}: {parent} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise error(f"cannot write {p}: folder {parent}: {_reason(e)}") from None
    if p.exists() and not os.access(p, os.W_OK):
        raise error(f"cannot write {p}: the file is read-only")
    return p


@contextlib.contextmanager
def atomic_write(
    path: Any, mode: str = "wb", error: type[PTQError] = SaveError, encoding: str | None = None
) -> Iterator[IO[Any]]:
    """``with atomic_write(path) as f: f.write(...)``: the file appears under ``path`` complete
    or not at all (see the module docstring). ``mode`` is ``"wb"`` or ``"w"`` (text, with
    ``encoding``, UTF-8 by default)."""
    p = check_writable(path, error)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as e:
        raise error(f"cannot write {p}: {_reason(e)}") from None
    done = False
    try:
        text = "b" not in mode
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if text else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, p)
        done = True
    except OSError as e:
        raise error(f"cannot write {p}: {_reason(e)}") from None
    finally:
        if not done:
            Path(tmp).unlink(missing_ok=True)


def write_bytes(path: Any, data: bytes, error: type[PTQError] = SaveError) -> Path:
    """Write ``data`` to ``path`` atomically; the path written."""
    with atomic_write(path, "wb", error) as f:
        f.write(data)
    return Path(path)


def write_text(path: Any, text: str, error: type[PTQError] = SaveError) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; the path written."""
    with atomic_write(path, "w", error) as f:
        f.write(text)
    return Path(path)


__all__ = ["atomic_write", "check_writable", "write_bytes", "write_text"]
