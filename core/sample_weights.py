"""Transformations of per-sample scheduler logits into loss weights, and priors over them.

Bayesian Data Scheduler (Hu et al., NeurIPS 2025) weights the fine-tuning likelihood of sample i by
sigma(w)_i. The paper ablates three transformations sigma; softmax is its default:

- ``softmax``: sigma(w)_i = n * exp(w_i) / sum_j exp(w_j). The weights average 1, so the weighted loss
  keeps the scale of the plain mean; raising one weight lowers the others ("bidirectional").
  d/dw_j sum_i sigma(w)_i l_i = sigma(w)_j (l_j - lbar) with lbar = sum_i sigma(w)_i l_i / n.
- ``sigmoid``: sigma(w)_i = 2 * sigmoid(w_i) (1 at w = 0; each weight moves on its own).
- ``identity``: sigma(w)_i = w_i.

The priors are negative log-densities (to be added to a minimised loss), as in the release's
``TrainableTensorModule``: negative entropy of softmax(w) (pulls towards uniform weights) and an
isotropic Gaussian on w.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Transform = Literal["softmax", "sigmoid", "identity"]
TRANSFORMS: tuple[str, ...] = ("softmax", "sigmoid", "identity")


def transform_weights(logits: Tensor, transform: Transform = "softmax") -> Tensor:
    """Map scheduler logits (n,) to weights (n,); ``softmax`` normalises over all n entries.

    Args:
        logits: (n,) raw scheduler outputs (all N dataset logits, or one batch for a neural scheduler).
        transform: ``softmax`` (n * softmax), ``sigmoid`` (2 * sigmoid) or ``identity``.

    Returns:
        (n,) weights in the dtype of ``logits``.
    """
    if transform == "softmax":
        return logits.numel() * torch.softmax(logits, dim=0)
    if transform == "sigmoid":
        return 2.0 * torch.sigmoid(logits)
    if transform == "identity":
        return logits
    raise ValueError(f"unknown weight transform {transform!r}; choose one of {list(TRANSFORMS)}")


def negative_entropy(logits: Tensor) -> Tensor:
    """sum_i p_i log p_i of p = softmax(logits): minimal (-log n) at uniform weights."""
    log_p = torch.log_softmax(logits, dim=0)
    return (log_p.exp() * log_p).sum()


def gaussian_negative_log_prior(logits: Tensor, mean: float, std: float) -> Tensor:
    """-log N(logits; mean, std^2 I), summed over entries (the release's ``gaussian_prior``)."""
    if std <= 0:
        raise ValueError(f"the Gaussian prior needs std > 0, got {std}")
    z = (logits - mean) / std
    return 0.5 * (z * z).sum() + logits.numel() * math.log(std * math.sqrt(2 * math.pi))
