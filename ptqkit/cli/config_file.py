"""``--config``: a TOML file whose keys are :class:`~ptqkit.PTQConfig` fields, with ``[weights]``,
``[activations]``, ``[adaround_options]`` and ``[bias_correction_options]`` tables for the nested
specs and ``activations = false`` for weights only (TOML has no null). Per-layer settings are
``[[scopes]]`` tables: a ``pattern`` and the overrides of :class:`~ptqkit.Scope`, e.g.::

    [[scopes]]
    pattern = "classifier*"
    weights = { bits = 8, per_channel = true }
    techniques = { bias_correction = false, adaround = false }

The values are validated by :class:`~ptqkit.PTQConfig` itself (one source of truth); this module
adds only what a file needs on top: the line of the file that is wrong, named as the reader wrote
it (an unknown key with its table and the closest valid key; a nested table's error prefixed with
the table's name), and the calibrator's and the techniques' names (``techniques``, a scope's
``techniques``) checked against the registries up front. Every problem is a
:class:`~.usage.UsageError` (exit code 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from pathlib import Path
from typing import Any

from ..calibrate import check_calibration
from ..config import PTQConfig
from ..errors import ConfigError
from ..techniques import check as check_techniques
from .usage import UsageError, one_line


def _tables(cls: type) -> dict[str, type]:
    """The fields of the dataclass ``cls`` that are dataclasses themselves (TOML tables)."""
    tables = {}
    for name, hint in typing.get_type_hints(cls).items():
        for h in (hint, *typing.get_args(hint)):
            if isinstance(h, type) and dataclasses.is_dataclass(h):
                tables[name] = h
    return tables


def _check_keys(d: dict[str, Any], cls: type, where: str, path: Path) -> None:
    """Every key of ``d`` (and of its nested tables) is a field of ``cls``; an unknown one is
    named with its table and the closest valid key."""
    names = [f.name for f in dataclasses.fields(cls)]
    tables = _tables(cls)
    for key, value in d.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(
                f"--config {path}: unknown key {where}{key!r}{hint}; valid keys: {', '.join(names)}"
            )
        if key in tables and isinstance(value, dict):
            _check_keys(value, tables[key], f"{where}{key}.", path)


def load_config(path: str | None) -> PTQConfig:
    """``--config``: the :class:`~ptqkit.PTQConfig` of a TOML file (``PTQConfig()`` without)."""
    if path is None:
        return PTQConfig()
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        import tomli as tomllib
    p = Path(path)
    try:
        d = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"--config {p}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {p}: invalid TOML: {one_line(e)}") from None
    if d.get("activations") is False:
        d["activations"] = None
    _check_keys(d, PTQConfig, "", p)
    for key, cls in _tables(PTQConfig).items():  # validated alone: the error names the table
        if isinstance(d.get(key), dict):
            try:
                cls(**d[key])
            except ConfigError as e:
                raise UsageError(f"--config {p}: [{key}] {one_line(e)}") from None
    try:
        config = PTQConfig.from_dict(d)
        check_calibration(config.calibration)
        check_techniques(config)
    except ConfigError as e:
        raise UsageError(f"--config {p}: {one_line(e)}") from None
    return config
