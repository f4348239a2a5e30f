"""Conv4, the few-shot standard backbone (placeholder written by the free branch to the lead's announced API;
main's version wins on merge)."""

from __future__ import annotations

from torch import Tensor, nn


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.max_pool2d(nn.functional.relu(self.bn(self.conv(x))), 2)


class Conv4(nn.Module):
    """4 x [conv3x3 -> BatchNorm2d -> ReLU -> MaxPool2d(2)] -> flatten -> optional linear head."""

    def __init__(self, in_channels: int = 1, hidden: int = 32, num_classes: int = 0, image_size: int = 28) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(in_channels if i == 0 else hidden, hidden) for i in range(4)])
        side = image_size
        for _ in range(4):
            side //= 2
        self.feature_dim = hidden * side * side
        self.head = nn.Linear(self.feature_dim, num_classes) if num_classes else nn.Identity()
        self.num_classes = num_classes

    def features(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
