"""Every file ptqkit writes: a path that cannot be written is a PTQError naming the user's path
and the reason (never a raw OSError naming a hidden temporary file), nothing is left behind,
and a file already there is untouched."""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit import ExportError, PTQConfig, SaveError
from ptqkit.io import files


@pytest.fixture(scope="module")
def qmodel() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    data = [torch.randn(16, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ptqkit.quantize(model, data, PTQConfig(progress=False))


def _writers(qmodel: nn.Module) -> dict:
    return {
        "save": (SaveError, lambda p: ptqkit.save(qmodel, p)),
        "export_onnx": (ExportError, lambda p: ptqkit.export_onnx(qmodel, p, torch.randn(1, 8))),
        "write_text": (SaveError, lambda p: files.write_text(p, "{}\n")),
    }


WRITERS = ("save", "export_onnx", "write_text")


def _no_leftovers(folder: Path) -> None:
    if folder.is_dir():
        assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("writer", WRITERS)
def test_a_missing_folder_is_named(tmp_path, qmodel, writer) -> None:
    error, write = _writers(qmodel)[writer]
    target = tmp_path / "missing" / "m.bin"
    with pytest.raises(error, match=rf"cannot write {target}: folder .*missing does not exist"):
        write(target)


@pytest.mark.parametrize("writer", WRITERS)
def test_a_folder_or_a_file_as_folder_is_named(tmp_path, qmodel, writer) -> None:
    error, write = _writers(qmodel)[writer]
    with pytest.raises(error, match="it is a folder"):
        write(tmp_path)
    (tmp_path / "plain").write_text("x")
    with pytest.raises(error, match=r"plain is not a folder"):
        write(tmp_path / "plain" / "m.bin")


@pytest.mark.parametrize("writer", WRITERS)
def test_a_folder_that_refuses_writes_is_named(tmp_path, qmodel, writer, monkeypatch) -> None:
    error, write = _writers(qmodel)[writer]

    def refuse(*args, **kwargs):  # what a read-only folder answers (root would not see it)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(files.tempfile, "TemporaryFile", refuse)
    target = tmp_path / "m.bin"
    with pytest.raises(error, match=rf"cannot write {target}: folder .*Permission denied"):
        write(target)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_read_only_folder_for_real(tmp_path, qmodel) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("this user can write into a read-only folder (root)")
        with pytest.raises(SaveError, match=rf"cannot write {ro / 'q.st'}: .*ermission denied"):
            ptqkit.save(qmodel, ro / "q.st")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("writer", WRITERS)
def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path, qmodel, writer, monkeypatch
) -> None:
    error, write = _writers(qmodel)[writer]
    target = tmp_path / "m.bin"
    target.write_bytes(b"old")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(error, match=rf"cannot write {target}: No space left on device") as e:
        write(target)
    assert ".tmp" not in str(e.value)
    assert target.read_bytes() == b"old"
    _no_leftovers(tmp_path)


def test_a_read_only_file_is_named(tmp_path, qmodel, monkeypatch) -> None:
    target = tmp_path / "q.st"
    target.write_bytes(b"old")
    monkeypatch.setattr(files.os, "access", lambda p, mode: False)
    with pytest.raises(SaveError, match=rf"cannot write {target}: the file is read-only"):
        ptqkit.save(qmodel, target)


def test_write_report_and_write_text_go_through_the_same_path(tmp_path, qmodel) -> None:
    from ptqkit.report.html import write_report

    with pytest.raises(SaveError, match=r"cannot write .*missing.*does not exist"):
        write_report(qmodel, tmp_path / "missing" / "r.html")
    written = files.write_text(tmp_path / "s.json", "{}\n")
    assert written.read_text() == "{}\n"
    assert oct(written.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    _no_leftovers(tmp_path)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
