"""N ResNet-10/18 classifiers trained as one (grouped convolutions, per-network BatchNorm), exported as
plain ``core.resnet.ResNet`` state dicts; the ResNet counterpart of ``core.stacked_conv4``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.resnet import ResNetBody
from core.stacked_conv4 import per_model_view


class StackedResNet(nn.Module):
    """``n_models`` independent ResNets evaluated in one pass.

    Args:
        n_models: stacked networks N.
        arch: ``resnet10`` or ``resnet18``.
        in_channels: image channels.
        num_classes: classes of each network's head.
        image_size: input side (recorded in the manifest).
        width: first-stage channels (release 64).
    """

    def __init__(self, n_models: int, arch: str = "resnet10", in_channels: int = 3, num_classes: int = 5,
                 image_size: int = 32, width: int = 64) -> None:
        super().__init__()
        self.n_models, self.arch, self.in_channels, self.num_classes = n_models, arch, in_channels, num_classes
        self.image_size, self.width = image_size, width
        self.body = ResNetBody(arch, in_channels, width, stack=n_models)
        self.feature_dim = self.body.feature_dim
        self.head_weight = nn.Parameter(torch.empty(n_models, num_classes, self.feature_dim))
        self.head_bias = nn.Parameter(torch.empty(n_models, num_classes))
        bound = self.feature_dim**-0.5  # nn.Linear's default init, per network
        nn.init.uniform_(self.head_weight, -bound, bound)
        nn.init.uniform_(self.head_bias, -bound, bound)

    def arch_kwargs(self) -> dict:
        """Constructor arguments of one exported ``core.resnet.ResNet``."""
        return {"arch": self.arch, "in_channels": self.in_channels, "num_classes": self.num_classes,
                "image_size": self.image_size, "width": self.width}

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (N, B, C, H, W) -> logits (N, B, num_classes)."""
        n, b = x.shape[:2]
        feats = self.body(x.transpose(0, 1).reshape(b, n * x.shape[2], *x.shape[3:]))
        feats = feats.view(b, n, -1).transpose(0, 1)
        return torch.baddbmm(self.head_bias[:, None], feats, self.head_weight.transpose(1, 2))

    def export(self, i: int) -> dict[str, Tensor]:
        """Network ``i`` as a ``core.resnet.ResNet`` state dict: rows ``i`` of every grouped tensor."""
        state = {}
        for name, t in [*self.body.named_parameters(), *self.body.named_buffers()]:
            if name.endswith("num_batches_tracked"):
                state[f"body.{name}"] = t
            else:
                rows = t.shape[0] // self.n_models
                state[f"body.{name}"] = t[i * rows:(i + 1) * rows]
        state["head.weight"], state["head.bias"] = self.head_weight[i], self.head_bias[i]
        return {k: v.detach().clone().contiguous() for k, v in state.items()}

    def per_model_tensors(self) -> dict[str, Tensor]:
        """Every parameter and running statistic viewed as (N, ...), network i at row i."""
        return per_model_view(self, self.n_models)
