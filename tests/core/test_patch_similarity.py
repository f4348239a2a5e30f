"""PSAQ-ViT's patch-similarity entropy: the KDE estimate against a naive loop, the hooked features
against a hand-computed attention output, and the direction of the prior."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from core import vit_tokens
from core.patch_similarity import PatchSimilarityPrior, similarity_entropy


def naive_entropy(features: torch.Tensor, bandwidth: float, grid_points: int) -> float:
    """Per image: every pairwise cosine, a Gaussian KDE at each grid point, the trapezoidal rule; mean."""
    b, n, _ = features.shape
    sims = [[[torch.nn.functional.cosine_similarity(features[i, p], features[i, q], dim=0).item()
              for q in range(n)] for p in range(n)] for i in range(b)]
    flat = [[s for row in image for s in row] for image in sims]
    lo, hi = min(min(f) for f in flat), max(max(f) for f in flat)
    grid = [lo + (hi - lo) * g / (grid_points - 1) for g in range(grid_points)]
    total = 0.0
    for values in flat:
        pdf = [sum(math.exp(-((x - v) / bandwidth) ** 2 / 2) for v in values) / len(values)
               / (bandwidth * math.sqrt(2 * math.pi)) + 1e-4 for x in grid]
        f = [-p * math.log(p) for p in pdf]
        total += sum((grid[g + 1] - grid[g]) * (f[g] + f[g + 1]) / 2 for g in range(grid_points - 1))
    return total / b


@pytest.mark.parametrize("bandwidth", [0.01, 0.2])
def test_entropy_matches_a_naive_loop(bandwidth: float) -> None:
    features = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = similarity_entropy(features, bandwidth, 7)
    assert float(got) == pytest.approx(naive_entropy(features, bandwidth, 7), rel=1e-9)


def test_spread_similarities_have_more_entropy_than_alike_patches() -> None:
    g = torch.Generator().manual_seed(1)
    varied = torch.randn(4, 16, 8, generator=g)
    alike = torch.randn(4, 1, 8, generator=g) + 0.01 * torch.randn(4, 16, 8, generator=g)
    # a spread over [-1, 1] has at most log 2 = 0.69 nats; near-identical patches pile up at cos = 1
    assert similarity_entropy(varied, 0.05) > similarity_entropy(alike, 0.05) + 0.2


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, num_classes=3,
                             depth=2, embed_dim=16, num_heads=2).eval()


def test_hook_reads_the_head_mean_attention_output_of_the_patch_tokens() -> None:
    model = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    with PatchSimilarityPrior(model) as prior:
        model(x)
    block, attn = model.blocks[0], model.blocks[0].attn
    h = block.norm1(vit_tokens.embed_tokens(model, x))
    b, n, _ = h.shape
    q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    out = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1) @ v  # (B, H, N, d_h): the release's matmul2
    expected = out.mean(dim=1)[:, model.num_prefix_tokens:]
    torch.testing.assert_close(prior._features[0], expected, rtol=1e-5, atol=1e-6)
    assert prior._features[0].shape == (2, 16, attn.head_dim)


def test_prior_reaches_the_pixels_and_needs_a_forward_and_a_vit() -> None:
    model = tiny_vit().requires_grad_(False)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    prior = PatchSimilarityPrior(model)
    with pytest.raises(RuntimeError, match="run a forward pass"):
        prior.loss()
    with prior:
        model(x)
    prior.loss().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not model.blocks[0].attn.proj._forward_pre_hooks  # hooks removed on exit
    with pytest.raises(ValueError, match="needs a ViT"):
        PatchSimilarityPrior(timm.create_model("resnet10t", pretrained=False, num_classes=3))
