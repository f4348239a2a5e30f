"""TGR's heterogeneity picture: the task-similarity matrix ordered by group, and the mean pairwise
gradient cosine of the teachers sampled inside a group over training."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from core.figures import save_figure
from core.task_similarity import order_by_group


def heterogeneity_figure(similarity: Tensor, groups: list[list[int]], cosine: dict[str, list[tuple[int, float]]],
                         path: str | Path) -> Path:
    """Left: S ordered group after group (group borders drawn). Right: one gradient-cosine curve per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = order_by_group(groups)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    image = left.imshow(similarity[order][:, order].numpy(), cmap="viridis")
    edge = -0.5
    for g in groups[:-1]:
        edge += len(g)
        left.axhline(edge, color="w", lw=1)
        left.axvline(edge, color="w", lw=1)
    left.set_title("task similarity S (ordered by group)")
    left.set_xlabel("teacher")
    fig.colorbar(image, ax=left, fraction=0.046)
    for name, points in cosine.items():
        if points:
            steps, values = zip(*points)
            right.plot(steps, values, marker=".", label=name)
    right.set_xlabel("step")
    right.set_ylabel("mean pairwise gradient cosine in the group")
    if cosine:
        right.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
