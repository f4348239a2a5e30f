"""Backbones of the continual-learning experiments: mammoth's ResNet-18, a small CNN and mammoth's MLP.

All return logits over every class of the stream (a single head; task-IL masks it at evaluation).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convolutions with BatchNorm) with a 1x1 projection shortcut when needed.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first convolution (and of the shortcut).
    """

    def __init__(self, in_planes: int = 64, planes: int = 64, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """mammoth's ResNet-18 (``backbone/ResNet18.py``): 3x3 stem without max-pool, stages [2, 2, 2, 2] of
    widths nf x (1, 2, 4, 8), global average pooling, linear head. nf = 64 (11.2 M parameters) is what
    the released code trains; nf = 20 is the "reduced ResNet-18" of GEM/A-GEM.

    Args:
        num_classes: outputs of the head.
        nf: width of the first stage.
        in_channels: image channels.
    """

    def __init__(self, num_classes: int = 10, nf: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        layers, in_planes = [], nf
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = nf * 2**i
            layers += [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU blocks (width w, 2w), max-pool between, global average pooling, linear head.
    Keeps BatchNorm so that the tests exercise refresh's handling of running statistics.

    Args:
        num_classes: outputs of the head.
        width: channels of the first convolution (the second has twice as many).
        in_channels: image channels.
    """

    def __init__(self, num_classes: int = 10, width: int = 32, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class MLP(nn.Module):
    """mammoth's MNISTMLP: flatten, two hidden ReLU layers of ``width`` (100 in mammoth), linear head.
    Deviation: PyTorch's default initialisation; mammoth re-initialises it with Xavier-uniform weights
    and zero biases.

    Args:
        num_classes: outputs of the head.
        in_features: flattened input size (C x H x W).
        width: hidden units per layer.
    """

    def __init__(self, num_classes: int = 10, in_features: int = 784, width: int = 100) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, width),
                                 nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def build_backbone(name: Literal["resnet18", "cnn", "mlp"], num_classes: int, width: int, in_channels: int,
                   image_size: int) -> nn.Module:
    """The backbone ``name``; ``width`` is nf (resnet18), the first conv width (cnn) or the hidden size (mlp)."""
    if name == "resnet18":
        return ResNet18(num_classes, width, in_channels)
    if name == "cnn":
        return SmallCNN(num_classes, width, in_channels)
    if name == "mlp":
        return MLP(num_classes, in_channels * image_size**2, width)
    raise ValueError(f"model.init_args.backbone: unknown backbone {name!r}; choose resnet18, cnn or mlp")
