"""N-way K-shot episodes over any labelled set, ProtoNet's classifier and the few-shot confidence interval.

An episode draws ``n_way`` classes and, from each, ``k_shot`` support and ``q_query`` query images without
replacement; the classes are relabelled ``0..n_way-1`` by their position in the draw. Sampling is one
batched operation over all episodes (random keys sorted per class), not a loop over images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def sample_episodes(labels: Tensor, n_way: int, k_shot: int, q_query: int, n_episodes: int,
                    generator: torch.Generator) -> Tensor:
    """Draw ``n_episodes`` episodes of dataset indices.

    Args:
        labels: (N,) int labels of the set the episodes are drawn from.
        n_way: classes per episode.
        k_shot: support images per class.
        q_query: query images per class.
        n_episodes: how many episodes.
        generator: the only source of randomness (same generator state, same episodes).

    Returns:
        LongTensor (n_episodes, n_way, k_shot + q_query): entry [e, w, j] is the index of an image of the
        episode's w-th class; j < k_shot are the support, the rest the query.

    Raises:
        ValueError: fewer than ``n_way`` classes, or a class with fewer than ``k_shot + q_query`` images.
    """
    labels = torch.as_tensor(labels).long().cpu()
    classes, counts = labels.unique(return_counts=True)
    per_episode = k_shot + q_query
    if n_way < 1 or k_shot < 1 or q_query < 0:
        raise ValueError(f"episodes need n_way >= 1, k_shot >= 1, q_query >= 0; got {n_way}, {k_shot}, {q_query}")
    if len(classes) < n_way:
        raise ValueError(f"n_way={n_way} but the split has only {len(classes)} classes; lower n_way")
    if counts.min() < per_episode:
        raise ValueError(
            f"k_shot + q_query = {per_episode} but class {int(classes[counts.argmin()])} has only {int(counts.min())} "
            "images; lower k_shot or q_query (or render more per class)"
        )
    # Members of every class as a padded (C, max_count) table, sorted by class.
    order = labels.argsort(stable=True)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
    width = int(counts.max())
    slot = torch.arange(width)
    table = order[(offsets.unsqueeze(1) + slot.clamp_max(counts.unsqueeze(1) - 1))]
    # Classes per episode: the first n_way of a random permutation; images: the smallest random keys
    # among each class's real members (padding slots get +inf, so they are never drawn).
    way = torch.rand(n_episodes, len(classes), generator=generator).argsort(dim=1)[:, :n_way]
    keys = torch.rand(n_episodes, n_way, width, generator=generator)
    keys = keys.masked_fill(slot >= counts[way].unsqueeze(-1), float("inf"))
    pick = keys.argsort(dim=-1)[..., :per_episode]
    return table[way].gather(-1, pick)


def prototype_logits(support: Tensor, query: Tensor) -> Tensor:
    """ProtoNet: minus the squared euclidean distance of each query to each class mean.

    Args:
        support: (E, n_way, k_shot, D) support features per episode and class.
        query: (E, M, D) query features.

    Returns:
        (E, M, n_way) logits.
    """
    prototypes = support.mean(dim=2)
    return -torch.cdist(query, prototypes).pow(2)


def mean_ci95(values: Tensor | Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of the 95 % interval, 1.96 * std / sqrt(n) with ddof = 0 (the releases' form)."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError("mean_ci95 of an empty sequence")
    std = values.std(unbiased=False) if values.numel() > 1 else values.new_zeros(())
    return float(values.mean()), float(1.96 * std / math.sqrt(values.numel()))
