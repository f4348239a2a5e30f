"""Reading profession and gender off generated glyph images: a Conv4 classifier and image-set metrics.

The classifier (:class:`core.conv4.Conv4` with one head of P + 2 logits: P professions, then female /
male) is trained on clean renders only, never on generated images. Metrics per set of generated images:
P(male), profession accuracy, mean confidence (max softmax of both heads, averaged) and the Frechet
distance between the classifier's features of the set and of clean renders (FID's formula on a
task-specific feature space).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.conv4 import Conv4


def train_attribute_classifier(images: Tensor, profession: Tensor, gender: Tensor, steps: int = 400,
                               batch_size: int = 64, lr: float = 3e-3, noise: float = 0.15, seed: int = 0) -> Conv4:
    """Conv4 on (N, C, H, W) images in [0, 1]; Gaussian noise augmentation so partly denoised samples read too."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n_prof = int(profession.max()) + 1
    model = Conv4(images.shape[1], 32, n_prof + 2, images.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x = (images[idx] + noise * torch.randn(images[idx].shape, generator=g)).clamp(0, 1)
        logits = model(x)
        loss = F.cross_entropy(logits[:, :n_prof], profession[idx]) + F.cross_entropy(logits[:, n_prof:], gender[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def read_attributes(model: Conv4, images: Tensor) -> dict[str, Tensor]:
    """Per image: profession probabilities (N, P), P(male) (N,), features (N, D)."""
    feats = model.features(images)
    logits = model.head(feats)
    prof = logits[:, :-2].softmax(-1)
    gender = logits[:, -2:].softmax(-1)
    return {"profession": prof, "p_male": gender[:, 1], "confidence": (prof.max(-1).values + gender.max(-1).values) / 2,
            "features": feats}


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two (N, D) feature sets."""
    from scipy import linalg

    a64, b64 = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a64.mean(0), b64.mean(0)
    s_a, s_b = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    root = linalg.sqrtm(s_a @ s_b)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


def image_metrics(model: Conv4, images: Tensor, profession: Tensor, reference: Tensor) -> dict[str, float]:
    """Set-level metrics of generated ``images`` meant to show ``profession`` against clean ``reference``
    features: p_male (fraction read male), bias 2|p_male - 0.5|, profession_acc, confidence, frechet."""
    out = read_attributes(model, images)
    male = (out["p_male"] > 0.5).float().mean().item()
    return {"p_male": male, "bias": 2 * abs(male - 0.5),
            "profession_acc": (out["profession"].argmax(-1) == profession).float().mean().item(),
            "confidence": out["confidence"].mean().item(), "frechet": frechet_distance(out["features"], reference)}
