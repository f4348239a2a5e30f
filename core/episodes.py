"""Episode sampling, ProtoNet logits, mean and 95% CI (placeholder written by the free branch to the lead's
announced API; main's version wins on merge)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def sample_episodes(labels: Tensor, n_way: int, k_shot: int, q_query: int, n_episodes: int,
                    generator: torch.Generator) -> Tensor:
    classes, counts = labels.unique(return_counts=True)
    if len(classes) < n_way:
        raise ValueError(f"n_way={n_way} but the split has only {len(classes)} classes")
    if counts.min() < k_shot + q_query:
        raise ValueError(f"k_shot + q_query={k_shot + q_query} but a class has only {int(counts.min())} images")
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    pick = torch.rand(n_episodes, len(classes), generator=generator).argsort(1)[:, :n_way]
    rank = torch.rand(n_episodes, n_way, int(counts.max()), generator=generator)
    rank = rank.masked_fill(torch.arange(int(counts.max())) >= counts[pick][..., None], 2.0)
    within = rank.argsort(2)[..., : k_shot + q_query]
    return order[starts[pick][..., None] + within]


def prototype_logits(support: Tensor, query: Tensor) -> Tensor:
    prototypes = support.mean(2)
    return -torch.cdist(query, prototypes).pow(2)


def mean_ci95(values: Tensor | Sequence[float]) -> tuple[float, float]:
    values = torch.as_tensor(values, dtype=torch.float64)
    return float(values.mean()), float(1.96 * values.std(unbiased=False) / math.sqrt(len(values)))
