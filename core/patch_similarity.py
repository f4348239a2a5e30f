"""PSAQ-ViT's patch-similarity prior for inverting Vision Transformers.

Li, Xiao, Liu, Gu. "Patch Similarity Aware Data-Free Quantization for Vision Transformers" (ECCV 2022),
Sec. 3.2-3.3. On real images a ViT's self-attention outputs for different patches are similar in
varied ways (the cosine similarities between patches spread out); on Gaussian noise they are all
alike. PSAQ therefore maximises the differential entropy of the patch-to-patch similarity
distribution of every block, estimated with a Gaussian kernel density:

    A_l     = mean over heads of softmax(Q K^T / sqrt(d)) V at block l, patch tokens only  -> ``PatchSimilarityPrior``
    S_l     = {cos(A_l[i], A_l[j]) : all patch pairs i, j}, per image                       -> ``similarity_entropy``
    p_l(s)  = 1/|S_l| sum_{s' in S_l} N(s; s', h^2), h = 0.01, on G = 10 points over [min S, max S]
    H_l     = -int p_l(s) log p_l(s) ds (trapezoidal rule; p + 1e-4 inside the log), mean over images
    L_PSE   = -sum_l H_l

The release (zkkli/PSAQ-ViT ``generate_data.py``) hooks ``attn.matmul2`` (attn @ v, (B, H, N, d_h)) and
averages over heads; timm's ``Attention`` has no such module, so the hook here reads the input of
``attn.proj``, the same tensor with the heads laid side by side, (B, N, H * d_h). The grid's end points
are the batch's extreme similarities, taken out of the graph as the release does (its ``.item()``), but
without leaving the device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.forward_hook_prior import ForwardHookPrior

PSAQ_BANDWIDTH, PSAQ_GRID = 0.01, 10


def similarity_entropy(features: Tensor, bandwidth: float = PSAQ_BANDWIDTH, grid_points: int = PSAQ_GRID) -> Tensor:
    """Batch-mean differential entropy of the pairwise cosine similarities of each image's tokens.

    Args:
        features: (B, N, D) token features of one block (patch tokens only).
        bandwidth: standard deviation h of the Gaussian kernel (PSAQ: 0.01).
        grid_points: points of the trapezoidal integration over [min, max] of the batch's similarities.
    """
    unit = F.normalize(features, dim=-1)
    sims = (unit @ unit.transpose(1, 2)).flatten(1)  # (B, N * N), the diagonal included as in the release
    lo, hi = sims.detach().min(), sims.detach().max()
    grid = lo + (hi - lo) * torch.linspace(0, 1, grid_points, device=sims.device, dtype=sims.dtype)  # (G,)
    # Gaussian kernel density at every grid point: mean over the image's similarities, (B, G)
    z = (grid[None, :, None] - sims[:, None, :]) / bandwidth
    density = torch.exp(-0.5 * z.square()).mean(dim=-1) / (bandwidth * math.sqrt(2 * math.pi))
    density = density + 1e-4  # the release's floor inside the logarithm
    return torch.trapezoid(-density * density.log(), grid, dim=-1).mean()


class PatchSimilarityPrior(ForwardHookPrior):
    """Context manager hooking the attention output of every block of a timm ViT; ``loss()`` is L_PSE.

    Args:
        model: a timm ``VisionTransformer`` (blocks with ``attn.proj`` and ``attn.num_heads``).
        bandwidth, grid_points: of ``similarity_entropy``.
    """

    def __init__(self, model: nn.Module, bandwidth: float = PSAQ_BANDWIDTH, grid_points: int = PSAQ_GRID) -> None:
        blocks = getattr(model, "blocks", None)
        if blocks is None or not all(hasattr(b, "attn") and hasattr(b.attn, "proj") for b in blocks):
            raise ValueError(f"{type(model).__name__}: the patch-similarity prior needs a ViT with blocks[i].attn.proj")
        self.attentions = [b.attn for b in blocks]
        self.prefix = getattr(model, "num_prefix_tokens", 1)
        self.bandwidth, self.grid_points = bandwidth, grid_points
        self._features: list[Tensor | None] = [None] * len(self.attentions)

    def _hook(self, i: int, heads: int):
        def hook(_proj: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            b, n, c = inputs[0].shape
            # (B, N, H * d_h) -> head mean (B, N, d_h), patch tokens only
            self._features[i] = inputs[0].view(b, n, heads, c // heads).mean(dim=2)[:, self.prefix:]

        return hook

    def _register(self) -> list:
        return [a.proj.register_forward_pre_hook(self._hook(i, a.num_heads)) for i, a in enumerate(self.attentions)]

    def loss(self) -> Tensor:
        """-sum over blocks of the similarity entropy of the most recent forward pass."""
        features = self._recorded(self._features, "PSAQ")
        return -sum(similarity_entropy(f, self.bandwidth, self.grid_points) for f in features)
