"""Seed models of the paper's benchmarks (MLPerf Tiny), in plain PyTorch.

resnet8  MLPerf Tiny image classification (CIFAR-10, 3x32x32): 77,360 conv + linear weights
dscnn    MLPerf Tiny keyword spotting, DS-CNN small (Speech Commands, 1x49x10 MFCC): 22,016
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _ResidualStack(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn, plus the input (a strided 1x1 conv when the shape changes), relu."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride) if stride != 1 or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet8(nn.Module):
    """MLPerf Tiny ResNet-8: conv 3->16, residual stacks of 16, 32 (stride 2), 64 (stride 2)
    channels, global average pool, fc 64 -> num_classes."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.stack1 = _ResidualStack(16, 16, 1)
        self.stack2 = _ResidualStack(16, 32, 2)
        self.stack3 = _ResidualStack(32, 64, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.stack3(self.stack2(self.stack1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class DSCNN(nn.Module):
    """MLPerf Tiny DS-CNN (small): conv 64 10x4 stride 2, four depthwise-separable blocks
    (depthwise 3x3 + pointwise 1x1, 64 channels), average pool, fc 64 -> num_classes.
    On a 1x49x10 input the feature map is 25x5."""

    def __init__(self, num_classes: int = 12, channels: int = 64, blocks: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, (10, 4), stride=2, padding=(5, 1), bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.drop1 = nn.Dropout(0.2)
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers += [
                nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                nn.BatchNorm2d(channels), nn.ReLU(),
                nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            ]
        self.blocks = nn.Sequential(*layers)
        self.drop2 = nn.Dropout(0.4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(F.relu(self.bn(self.conv(x))))
        x = self.drop2(self.blocks(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet8(num_classes: int = 10) -> ResNet8:
    """MLPerf Tiny ResNet-8 for 3x32x32 inputs."""
    return ResNet8(num_classes)


def dscnn(num_classes: int = 12) -> DSCNN:
    """MLPerf Tiny DS-CNN small for 1x49x10 MFCC inputs."""
    return DSCNN(num_classes)
