"""Small architectures netmeld's demo, tests and benchmarks train; importable so that a saved
combined model can rebuild them (``architecture="netmeld.zoo:small_cnn"``)."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """A small BatchNorm CNN: ``blocks`` conv blocks (the first keeps the size, each later one
    halves it), global average pooling, and a linear head ``fc``."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, width: int = 32, blocks: int = 3
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(blocks):
            out = width * (2 ** min(i, 2))
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.num_features = channels
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def small_cnn(
    num_classes: int = 10, in_channels: int = 1, width: int = 32, blocks: int = 3
) -> SmallCNN:
    """Build a :class:`SmallCNN` (the callable named in saved recipes)."""
    return SmallCNN(num_classes, in_channels, width, blocks)


class MLP(nn.Module):
    """A small MLP for vectors: ``in_features -> hidden (x depth) -> num_classes``."""

    def __init__(
        self, in_features: int, num_classes: int, hidden: int = 64, depth: int = 2
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def mlp(in_features: int, num_classes: int, hidden: int = 64, depth: int = 2) -> MLP:
    """Build an :class:`MLP`."""
    return MLP(in_features, num_classes, hidden, depth)
