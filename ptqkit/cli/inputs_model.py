"""``--model``: ``package.module:callable`` (an ``nn.Module``, or a callable returning one) or a
``torch.export`` ``.pt2`` file, as a module in eval mode; the ATen graph of an exported program is
lifted back to modules (:func:`ptqkit.capture.aten.lift_aten`). Every problem raises
:class:`~.usage.UsageError` naming the flag.

A ``.pt2`` file is checked before it is read so that loading it never unpickles arbitrary
objects: only archives whose tensors are stored raw are accepted, every ``torch.load`` inside
``torch.export.load`` runs with ``weights_only=True`` (it would otherwise fall back to full
unpickling), and archives holding compiled code (AOTInductor) or pickled objects are refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import fx, nn

from ..capture.aten import lift_aten
from .usage import UsageError, one_line
from .user_code import call, import_attr


def load_model(spec: str) -> nn.Module:
    """``--model``: ``package.module:callable`` or a ``.pt2`` file, as a module in eval mode."""
    if spec.endswith(".pt2"):
        model = load_pt2(Path(spec))
    elif ":" in spec:
        obj = import_attr(spec, "--model")
        model = obj if isinstance(obj, nn.Module) else call(obj, spec, "--model")
        if not isinstance(model, nn.Module):
            raise UsageError(
                f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module"
            )
        if isinstance(model, fx.GraphModule) and "eval" in vars(model):
            # ExportedProgram.module(): ATen ops, eval() disabled
            model = lift_aten(model)
    else:
        raise UsageError(f"--model {spec!r}: expected package.module:callable or a .pt2 file")
    return model.eval()


def _check_pt2(path: Path) -> None:
    """Refuse a .pt2 archive whose loading could unpickle objects or load compiled code."""
    import zipfile

    from torch.export.pt2_archive import constants as C

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            root = names[0].split("/")[0] + "/" if names and "/" in names[0] else ""
            rel = [n[len(root) :] if n.startswith(root) else n for n in names]
            if C.ARCHIVE_VERSION_PATH not in rel:
                raise UsageError(
                    f"--model {path}: not a torch.export archive of this format (no "
                    f"{C.ARCHIVE_VERSION_PATH}); re-save it with torch.export.save"
                )
            for n in rel:
                if n.startswith((C.AOTINDUCTOR_DIR, C.EXECUTORCH_DIR, C.MTIA_DIR)):
                    raise UsageError(f"--model {path}: holds compiled code ({n}); refused")
                if n.startswith((C.WEIGHTS_DIR, C.CONSTANTS_DIR)) and n.endswith(".pt"):
                    raise UsageError(f"--model {path}: legacy pickled weights ({n}); refused")
            for n, full in zip(rel, names):
                if not (n.endswith("_weights_config.json") or n.endswith("_constants_config.json")):
                    continue
                config = json.loads(z.read(full)).get("config", {})
                for fqn, meta in config.items():
                    pickled = meta.get("use_pickle") or not str(
                        meta.get("path_name", "")
                    ).startswith((C.WEIGHT_FILENAME_PREFIX, C.TENSOR_CONSTANT_FILENAME_PREFIX))
                    if pickled:
                        raise UsageError(
                            f"--model {path}: {fqn} is stored as a pickled object, which ptqkit "
                            "never loads (it could run arbitrary code); refused"
                        )
    except zipfile.BadZipFile:
        raise UsageError(f"--model {path}: not a .pt2 archive (not a zip file)") from None
    except (OSError, ValueError, AttributeError) as e:
        raise UsageError(f"--model {path}: cannot read the archive: {one_line(e)}") from None


def load_pt2(path: Path) -> Any:
    """A ``torch.export`` program from ``path`` as an ``nn.Module`` whose conv/linear/batch-norm
    calls are modules again (so ptqkit can fold and quantize them). Never unpickles objects."""
    import torch

    if not path.is_file():
        raise UsageError(f"--model {path}: no such file")
    _check_pt2(path)
    real_load = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    torch.load = weights_only_load  # the loader falls back to weights_only=False otherwise
    try:
        with warnings.catch_warnings(), _quiet_logger("torch"):
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"--model {path}: torch.export.load failed: {one_line(e)}") from None
    finally:
        torch.load = real_load
    return lift_aten(program.module())


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)
