"""``--out``: checked before any work (existing content is refused without ``--force``); the
folder itself is created when the first file is written (by :func:`ptqkit.run_job`)."""

from __future__ import annotations

from pathlib import Path

from .usage import UsageError


def prepare_out(path: str, force: bool, is_file: bool = False) -> Path:
    """``path`` as a folder to write into (or, with ``is_file``, a file to write), or a
    :class:`~.usage.UsageError` saying why it cannot be."""
    p = Path(path)
    if is_file:
        if p.is_dir():
            raise UsageError(f"--out {p} is a folder; give the path of the .html file to write")
        if p.exists() and not force:
            raise UsageError(f"--out {p} exists; add --force to overwrite it")
        if not p.parent.is_dir():
            raise UsageError(f"--out {p}: folder {p.parent} does not exist")
        return p
    if p.exists() and not p.is_dir():
        raise UsageError(f"--out {p} exists and is not a folder")
    if p.is_dir() and any(p.iterdir()) and not force:
        raise UsageError(f"--out {p} exists and is not empty; add --force to overwrite its files")
    if not p.exists():
        above = next(a for a in p.absolute().parents if a.exists())
        if not above.is_dir():
            raise UsageError(f"--out {p}: cannot create the folder: {above} is not a folder")
    return p
