"""Small architectures netmeld's demo, tests and benchmarks train; importable so that a saved
combined model can rebuild them (``architecture="netmeld.zoo:small_cnn"``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """A small BatchNorm CNN: ``blocks`` conv blocks (the first keeps the size, each later one
    halves it) with ``kernel_size`` x ``kernel_size`` convolutions, global average pooling, and a
    linear head ``fc``."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 32,
        blocks: int = 3,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(blocks):
            out = width * (2 ** min(i, 2))
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [
                nn.Conv2d(channels, out, kernel_size, padding=kernel_size // 2, bias=False),
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
    num_classes: int = 10,
    in_channels: int = 1,
    width: int = 32,
    blocks: int = 3,
    kernel_size: int = 3,
) -> SmallCNN:
    """Build a :class:`SmallCNN` (the callable named in saved recipes)."""
    return SmallCNN(num_classes, in_channels, width, blocks, kernel_size)


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


class VGG(nn.Module):
    """A VGG-style CNN without BatchNorm: conv-ReLU stages with max pooling, then a flattened
    map into two linear layers (``classifier``); the flatten keeps the spatial positions."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, ...] = (16, 32, 32),
        image_size: int = 32,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        size = image_size
        for w in widths:
            layers += [nn.Conv2d(channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = w
            size //= 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * size * size, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg(
    num_classes: int = 10,
    in_channels: int = 3,
    widths: tuple[int, ...] | list[int] = (16, 32, 32),
    image_size: int = 32,
    hidden: int = 64,
) -> VGG:
    """Build a :class:`VGG`."""
    return VGG(num_classes, in_channels, tuple(widths), image_size, hidden)


class BasicBlock(nn.Module):
    """ResNet basic block. Where the shape changes the shortcut is a 1x1 conv + BatchNorm
    (``shortcut="conv"``, option B) or a strided identity padded with zero channels
    (``shortcut="pad"``, option A of He et al. 2016, as in the widely shared CIFAR checkpoints)."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str = "conv") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Sequential()
        if (stride != 1 or cin != cout) and shortcut == "pad":
            self.shortcut = PadShortcut(cout - cin, stride)
        elif stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride``, pad ``extra`` zero channels (half each side)."""

    def __init__(self, extra: int, stride: int) -> None:
        super().__init__()
        self.extra, self.stride = extra, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016 (ResNet-20 at ``depth=20``), ``width`` times as wide
    (ZipIt!'s ResNet-20x4 is ``width=4``). ``shortcut="pad"`` builds option A, whose tensors
    match the popular pretrained CIFAR-10 ResNet-20/32/44/56 checkpoints (their ``linear`` is
    our ``fc``)."""

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        width: int = 1,
        in_channels: int = 3,
        shortcut: str = "conv",
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2, got {depth}")
        if shortcut not in ("conv", "pad"):
            raise ValueError(f"shortcut must be 'conv' or 'pad', got {shortcut!r}")
        n = (depth - 2) // 6
        w = 16 * width
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        stages: list[nn.Module] = []
        cin = w
        for i, cout in enumerate((w, 2 * w, 4 * w)):
            blocks = [
                BasicBlock(cin if j == 0 else cout, cout, 2 if (i and not j) else 1, shortcut)
                for j in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = out.mean((2, 3))
        return self.fc(out)


def resnet20(
    num_classes: int = 10,
    width: int = 1,
    in_channels: int = 3,
    depth: int = 20,
    shortcut: str = "conv",
) -> CifarResNet:
    """Build a :class:`CifarResNet` (any ``depth`` = 6n + 2: 20, 32, 44, 56, ...)."""
    return CifarResNet(depth, num_classes, width, in_channels, shortcut)
