"""Conv4, the standard few-shot backbone: four blocks of 3x3 convolution, BatchNorm, ReLU, 2x2 max-pool.

It is the backbone of MAML, ProtoNet and the data-free meta-learning releases (FREE, TGR use 32 channels).
With ``image_size`` 28 the features are ``hidden`` wide (28 -> 14 -> 7 -> 3 -> 1), with 32 they are
``4 * hidden`` and with MiniImageNet's 84 ``25 * hidden`` (800 for 32 channels).
"""

from __future__ import annotations

from torch import Tensor, nn


class ConvBlock(nn.Module):
    """conv3x3 (padding 1) -> BatchNorm2d -> ReLU -> MaxPool2d(2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.bn(self.conv(x)).relu())


class Conv4(nn.Module):
    """Four :class:`ConvBlock` s and an optional linear head.

    Args:
        in_channels: input channels (1 for glyphs and MNIST, 3 for RGB).
        hidden: channels of every block.
        num_classes: width of the linear head; 0 builds no head and ``forward`` returns the features.
        image_size: input side in pixels; it fixes :attr:`feature_dim`.
    """

    def __init__(self, in_channels: int = 1, hidden: int = 32, num_classes: int = 0, image_size: int = 28) -> None:
        super().__init__()
        if image_size < 16:
            raise ValueError(f"Conv4 needs image_size >= 16 (four 2x2 poolings), got {image_size}")
        self.blocks = nn.Sequential(*(ConvBlock(in_channels if i == 0 else hidden, hidden) for i in range(4)))
        side = image_size
        for _ in range(4):
            side //= 2
        self.feature_dim = hidden * side * side
        self.head = nn.Linear(self.feature_dim, num_classes) if num_classes > 0 else None

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, feature_dim), flattened after the fourth block."""
        return self.blocks(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        return features if self.head is None else self.head(features)
