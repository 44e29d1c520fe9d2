"""Real data sets that load offline: Fashion-MNIST (Debian package), sklearn digits, and the
photos that ship inside scikit-image (for ImageNet models, which have no labeled data here).

Every loader returns fresh tensors; the parsed raw arrays are cached in memory, so repeated calls
are cheap and callers may modify what they get back.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .extras import require

__all__ = [
    "EXTRA_PHOTO_NAMES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "PHOTO_NAMES",
    "digits",
    "fashion_mnist",
    "photo_crops",
    "photos",
    "split",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: Natural RGB photos bundled in the scikit-image wheel (no download needed). Used by default.
PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle")
#: Further bundled RGB images (microscopy, telescope, fundus): real, but far from ImageNet.
EXTRA_PHOTO_NAMES = ("immunohistochemistry", "hubble_deep_field", "retina")


# --------------------------------------------------------------------------- Fashion-MNIST
def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse one gzipped IDX file (big-endian header: magic, then ``ndim`` dimension sizes)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = 4 + 4 * ndim
    got_magic, *dims = np.frombuffer(raw, dtype=">u4", count=1 + ndim).tolist()
    if got_magic != magic:
        raise ValueError(f"{path}: bad IDX magic number {got_magic} (expected {magic})")
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated IDX file ({data.size} bytes for shape {dims})")
    return data.reshape(dims).copy()  # writable, so torch.from_numpy does not warn


@functools.lru_cache(maxsize=2)
def _fashion_mnist_raw(split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = _FMNIST_FILES[split]
    images_path, labels_path = FASHION_MNIST_DIR / images_name, FASHION_MNIST_DIR / labels_name
    for p in (images_path, labels_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {p} not found; install the data set with "
                "`apt-get update && apt-get install -y dataset-fashion-mnist`"
            )
    images = _read_idx(images_path, 2051, 3)
    labels = _read_idx(labels_path, 2049, 1)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train": 60k, "test": 10k) from the Debian package files.

    Returns images as float32 ``N×1×28×28`` normalized ``(x/255 - 0.2860)/0.3530`` and labels as
    int64 ``N``. Raises ``FileNotFoundError`` when ``dataset-fashion-mnist`` is not installed.
    """
    if split not in _FMNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = _fashion_mnist_raw(split)
    x = torch.from_numpy(images).to(torch.float32).unsqueeze(1)
    x = (x / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return x, torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------- digits
@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    d = require("sklearn.datasets", "the digits data set").load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8×8 digits: float32 ``N×1×8×8`` (scaled to [0, 1], then standardized
    with the data set's global mean and std) and int64 labels 0-9, in sklearn's order."""
    images, labels = _digits_raw()
    x = torch.from_numpy(images).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    return x, torch.from_numpy(labels.copy())


def split(
    x: torch.Tensor, y: torch.Tensor, n_test: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministically shuffle ``(x, y)`` with a seeded ``torch.Generator`` and split off the
    last ``n_test`` samples. Returns ``(x_train, y_train, x_test, y_test)``."""
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} samples but y has {len(y)}")
    if not 0 < n_test < n:
        raise ValueError(f"n_test must be in (0, {n}), got {n_test}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    train, test = perm[: n - n_test], perm[n - n_test :]
    return x[train], y[train], x[test], y[test]


# --------------------------------------------------------------------------- photos
@functools.lru_cache(maxsize=16)
def _photo_uint8(name: str) -> torch.Tensor:
    """One bundled scikit-image photo as a uint8 ``3×H×W`` tensor."""
    skdata = require("skimage.data", "the bundled photos")
    if name == "motorcycle":
        img = skdata.stereo_motorcycle()[0]  # left view of the stereo pair
    elif name in PHOTO_NAMES + EXTRA_PHOTO_NAMES:
        img = getattr(skdata, name)()
    else:
        raise ValueError(f"unknown photo {name!r}; choose from {PHOTO_NAMES + EXTRA_PHOTO_NAMES}")
    img = np.ascontiguousarray(img[..., :3])
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()


def _efficientnet_preprocess(x: torch.Tensor) -> torch.Tensor:
    """Map RGB in [0, 1] to EfficientNet-Lite's input range: ``(x*255 - 127)/128``."""
    return (x.clamp(0.0, 1.0) * 255.0 - 127.0) / 128.0


def _resize(crop: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``3×h×w`` → float ``3×size×size`` in [0, 1] (bilinear, antialiased)."""
    x = crop.unsqueeze(0).to(torch.float32) / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0]


def photos(
    size: int = 224, names: tuple[str, ...] = PHOTO_NAMES, crop_fraction: float = 0.875
) -> torch.Tensor:
    """The photos ``names`` (default :data:`PHOTO_NAMES`) center-cropped to a square of
    ``crop_fraction`` of the short side (the usual ImageNet evaluation crop, 224/256) and resized
    to ``size``, preprocessed for EfficientNet-Lite: float32 ``P×3×size×size``.

    With EfficientNet-Lite0, chelsea → tiger cat (ImageNet 282; 281 tabby and 285 Egyptian cat
    follow closely), coffee → espresso (967).
    """
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    out = []
    for name in names:
        img = _photo_uint8(name)
        h, w = img.shape[1:]
        s = max(1, round(crop_fraction * min(h, w)))
        top, left = (h - s) // 2, (w - s) // 2
        out.append(_resize(img[:, top : top + s, left : left + s], size))
    return _efficientnet_preprocess(torch.stack(out))


def photo_crops(
    n: int, size: int = 224, seed: int = 0, names: tuple[str, ...] = PHOTO_NAMES
) -> torch.Tensor:
    """``n`` random square crops of the bundled photos ``names`` (cycled in order), for
    calibrating / comparing ImageNet models where no ImageNet images are available.

    Each crop has a side of a random 0.3-1.0 fraction of the photo's short side, a random
    position and a random horizontal flip; it is resized to ``size×size`` (bilinear, antialias)
    and preprocessed as ``(x*255 - 127)/128``. Returns float32 ``n×3×size×size``; the same
    ``seed`` always gives the same crops.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not names:
        raise ValueError("names must name at least one photo")
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = _photo_uint8(names[i % len(names)])
        h, w = img.shape[1:]
        scale = 0.3 + 0.7 * torch.rand((), generator=g).item()
        side = max(1, round(scale * min(h, w)))
        top = int(torch.randint(0, h - side + 1, (), generator=g))
        left = int(torch.randint(0, w - side + 1, (), generator=g))
        crop = img[:, top : top + side, left : left + side]
        if torch.rand((), generator=g).item() < 0.5:
            crop = crop.flip(-1)
        out[i] = _resize(crop, size)
    return _efficientnet_preprocess(out)
