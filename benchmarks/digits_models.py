"""The digits CNNs that structured-pruning and training measurements share (8x8 grey images, 10 classes).

- `plain_cnn()`: conv-BN-ReLU x 3 (32, 64, 64 channels, a 2x2 max-pool after the second), global
  average pool, linear classifier;
- `residual_cnn()`: a stem, two residual stages (the second with stride 2 and a 1x1 convolution +
  BN downsample on its shortcut), global average pool, linear classifier.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class PlainCNN(nn.Module):
    def __init__(self, widths: tuple[int, int, int] = (32, 64, 64), classes: int = 10):
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(conv_bn(1, a), conv_bn(a, b), nn.MaxPool2d(2), conv_bn(b, c))
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = x if self.down is None else self.down(x)
        return torch.relu(self.conv2(self.conv1(x)) + short)


class ResidualCNN(nn.Module):
    def __init__(self, widths: tuple[int, int] = (32, 64), classes: int = 10):
        super().__init__()
        a, b = widths
        self.stem = conv_bn(1, a)
        self.stage1 = ResidualBlock(a, a)
        self.stage2 = ResidualBlock(a, b, stride=2)
        self.head = nn.Linear(b, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage2(self.stage1(self.stem(x))).mean(dim=(2, 3)))


def plain_cnn(seed: int = 0) -> PlainCNN:
    torch.manual_seed(seed)
    return PlainCNN()


def residual_cnn(seed: int = 0) -> ResidualCNN:
    torch.manual_seed(seed)
    return ResidualCNN()
