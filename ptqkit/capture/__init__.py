"""Capture: trace, fold BatchNorm, wrap layers and place activation quantizers."""

from .prepare import prepare
from .trace import fold_batchnorms, fold_bn_into, trace

__all__ = ["fold_batchnorms", "fold_bn_into", "prepare", "trace"]
