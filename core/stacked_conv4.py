"""N Conv4 networks trained as one: grouped convolutions, one group per network.

A model zoo of N small classifiers trained one after another is N Python training loops of tiny
kernels, dominated by per-call overhead on a CPU. Stacking them turns every layer into one grouped
convolution (``groups=N``) over ``N * hidden`` channels; ``BatchNorm2d(N * hidden)`` normalises each
channel over its own teacher's batch only, so each network keeps its own running statistics exactly
as an independent :class:`core.conv4.Conv4` would. The head is a batched matmul. Network ``i`` is
exported as a plain ``Conv4`` state dict with :meth:`StackedConv4.export`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.conv4 import Conv4


class StackedConv4(nn.Module):
    """``n_models`` independent Conv4 classifiers evaluated in one pass.

    Args:
        n_models: number of stacked networks N.
        in_channels: image channels.
        hidden: channels of every Conv4 block (the FREE/TGR release uses 32).
        num_classes: classes of each network's head.
        image_size: square input size (sets the flattened feature size as in ``Conv4``).
    """

    def __init__(self, n_models: int, in_channels: int = 1, hidden: int = 32, num_classes: int = 5,
                 image_size: int = 28) -> None:
        super().__init__()
        self.n_models, self.in_channels, self.hidden, self.num_classes = n_models, in_channels, hidden, num_classes
        self.image_size = image_size
        template = Conv4(in_channels, hidden, num_classes, image_size)
        self.feature_dim = template.feature_dim
        self.convs = nn.ModuleList(
            nn.Conv2d(n_models * (in_channels if i == 0 else hidden), n_models * hidden, 3, padding=1,
                      groups=n_models, bias=template.blocks[i].conv.bias is not None)
            for i in range(4)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(n_models * hidden) for _ in range(4))
        self.head_weight = nn.Parameter(torch.empty(n_models, num_classes, self.feature_dim))
        self.head_bias = nn.Parameter(torch.empty(n_models, num_classes))
        bound = self.feature_dim**-0.5  # nn.Linear's default init, per network
        nn.init.uniform_(self.head_weight, -bound, bound)
        nn.init.uniform_(self.head_bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (N, B, C, H, W), network i's batch at ``x[i]`` -> logits (N, B, num_classes)."""
        n, b = x.shape[:2]
        h = x.transpose(0, 1).reshape(b, n * x.shape[2], *x.shape[3:])
        for conv, bn in zip(self.convs, self.bns):
            h = F.max_pool2d(F.relu(bn(conv(h))), 2)
        feats = h.reshape(b, n, -1).transpose(0, 1)  # (N, B, hidden * s * s), Conv4's flatten order
        return torch.baddbmm(self.head_bias[:, None], feats, self.head_weight.transpose(1, 2))

    def export(self, i: int) -> dict[str, Tensor]:
        """Network ``i`` as a ``core.conv4.Conv4`` state dict (cloned tensors)."""
        h = self.hidden
        rows = slice(i * h, (i + 1) * h)
        state: dict[str, Tensor] = {}
        for k, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            state[f"blocks.{k}.conv.weight"] = conv.weight[rows]
            if conv.bias is not None:
                state[f"blocks.{k}.conv.bias"] = conv.bias[rows]
            for name in ("weight", "bias", "running_mean", "running_var"):
                state[f"blocks.{k}.bn.{name}"] = getattr(bn, name)[rows]
            state[f"blocks.{k}.bn.num_batches_tracked"] = bn.num_batches_tracked
        state["head.weight"] = self.head_weight[i]
        state["head.bias"] = self.head_bias[i]
        return {k: v.detach().clone().contiguous() for k, v in state.items()}

    def arch_kwargs(self) -> dict:
        """Constructor arguments of one exported ``core.conv4.Conv4``."""
        return {"in_channels": self.in_channels, "hidden": self.hidden, "num_classes": self.num_classes,
                "image_size": self.image_size}

    def per_model_tensors(self) -> dict[str, Tensor]:
        """Every parameter and running statistic viewed as (N, ...), network i at row i (for per-network
        model selection); the shared BatchNorm step counters are left out."""
        return per_model_view(self, self.n_models)


def per_model_view(module: nn.Module, n_models: int) -> dict[str, Tensor]:
    """Parameters and buffers of a stacked module as (N, -1) views (network-major rows), step counters left out."""
    return {name: t.view(n_models, -1) for name, t in [*module.named_parameters(), *module.named_buffers()]
            if not name.endswith("num_batches_tracked")}
