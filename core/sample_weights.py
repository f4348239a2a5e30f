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
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from core.figures import save_figure

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


def plot_weight_history(history: list[dict[str, float]], path: Path, title: str = "sample weights") -> Path:
    """Draw the mean weight of harmful and benign fine-tuning rows (and the weight AUROC) per epoch as a PNG.

    Args:
        history: one dict per record with ``epoch`` and any of ``weight_mean_harmful``, ``weight_mean_benign``,
            ``weight_auroc`` (records missing a key are skipped for that curve).
        path: the PNG to write (its folder is created).
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for key, label, color in (("weight_mean_harmful", "harmful rows", "tab:red"),
                              ("weight_mean_benign", "benign rows", "tab:blue")):
        points = [(h["epoch"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker="o", color=color, label=label)
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("epoch (0: before training)")
    ax.set_ylabel("mean weight")
    auroc = [(h["epoch"], h["weight_auroc"]) for h in history if "weight_auroc" in h]
    if auroc:
        twin = ax.twinx()
        twin.plot(*zip(*auroc), color="black", ls="--", lw=1, label="AUROC (-weight vs harmful)")
        twin.set_ylim(0, 1.02)
        twin.set_ylabel("AUROC", fontsize=8)
        twin.legend(loc="lower right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
