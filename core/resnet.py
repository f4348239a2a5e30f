"""ResNet-10 / ResNet-18 of the data-free meta-learning releases (FREE/TGR ``network.py``), stackable.

SimpleBlock stages [1, 1, 1, 1] (ResNet-10) or [2, 2, 2, 2] (ResNet-18), widths w, 2w, 4w, 8w (release
w = 64), a 3x3 stride-1 stem without max-pool, stride 2 from the second stage on, global average pool.
:class:`ResNetBody` with ``stack=N`` is N independent bodies in one: every convolution is grouped
(``groups=N``) and every BatchNorm spans ``N x channels``, so each network keeps its own statistics
(``core.stacked_resnet`` trains zoos with it); ``stack=1`` is the plain network.
"""

from __future__ import annotations

from torch import Tensor, nn

DEPTHS = {"resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2)}


class SimpleBlock(nn.Module):
    """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, plus the (1x1 conv + BN) shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, stack: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(stack * cin, stack * cout, 3, stride, 1, bias=False, groups=stack)
        self.bn1 = nn.BatchNorm2d(stack * cout)
        self.conv2 = nn.Conv2d(stack * cout, stack * cout, 3, 1, 1, bias=False, groups=stack)
        self.bn2 = nn.BatchNorm2d(stack * cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(stack * cin, stack * cout, 1, stride, bias=False, groups=stack),
                                          nn.BatchNorm2d(stack * cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        return (out + (x if self.shortcut is None else self.shortcut(x))).relu()


class ResNetBody(nn.Module):
    """Stem and four stages; ``(B, stack * C, H, W) -> (B, stack * 8w)`` pooled features.

    Args:
        arch: ``resnet10`` or ``resnet18``.
        in_channels: image channels.
        width: channels of the first stage (release 64).
        stack: independent networks evaluated in one pass (grouped convolutions).
    """

    def __init__(self, arch: str = "resnet10", in_channels: int = 3, width: int = 64, stack: int = 1) -> None:
        super().__init__()
        if arch not in DEPTHS:
            raise ValueError(f"unknown ResNet {arch!r}; known: {', '.join(DEPTHS)}")
        self.stem = nn.Sequential(nn.Conv2d(stack * in_channels, stack * width, 3, 1, 1, bias=False, groups=stack),
                                  nn.BatchNorm2d(stack * width), nn.ReLU())
        blocks, cin = [], width
        for stage, n in enumerate(DEPTHS[arch]):
            cout = width * 2**stage
            for b in range(n):
                blocks.append(SimpleBlock(cin, cout, 2 if stage and b == 0 else 1, stack))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = cin

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x)).mean((2, 3))


class ResNet(nn.Module):
    """A ResNet-10/18 classifier (``features`` + linear ``head``), the teacher of multi-architecture zoos.

    Args:
        arch: ``resnet10`` or ``resnet18``.
        in_channels: image channels.
        num_classes: head width (0: no head, ``forward`` returns the features).
        image_size: input side (kept for the manifest; the global pool takes any size).
        width: channels of the first stage (release 64).
    """

    def __init__(self, arch: str = "resnet10", in_channels: int = 3, num_classes: int = 5, image_size: int = 32,
                 width: int = 64) -> None:
        super().__init__()
        self.body = ResNetBody(arch, in_channels, width)
        self.feature_dim = self.body.feature_dim
        self.head = nn.Linear(self.feature_dim, num_classes) if num_classes > 0 else None

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)
        return f if self.head is None else self.head(f)
