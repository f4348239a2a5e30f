"""Continual-learning metrics from the accuracy matrix, with mammoth's formulas (``utils/metrics.py``).

``a[t, i]`` is the accuracy on task ``i`` after training on tasks ``0..t`` (all tasks are evaluated after
every task, so entries above the diagonal exist and give forward transfer); ``r[i]`` is the accuracy of
the randomly initialised network on task ``i``. With ``T`` finished tasks:

- final average accuracy  A = 1/T sum_i a[T-1, i]                        (the paper's table numbers)
- backward transfer       BWT = 1/(T-1) sum_{i<T-1} (a[T-1, i] - a[i, i])
- forgetting              F = 1/(T-1) sum_{i<T-1} (max_{t>=i} a[t, i] - a[T-1, i])
  (mammoth zero-pads the rows before taking the column maximum, i.e. only t >= i counts)
- forward transfer        FWT = 1/(T-1) sum_{i>=1} (a[i-1, i] - r[i])
- average incremental accuracy (PyCIL's headline) = 1/T sum_t mean_{i<=t} a[t, i]

The same formulas apply to class-IL and task-IL matrices.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from core.figures import save_figure


def stream_metrics(matrix: Tensor, random_init: Tensor | None = None) -> dict[str, float]:
    """Summary metrics of a ``(T, T)`` accuracy matrix (rows: after task t; columns: task i)."""
    a = matrix.double()
    tasks = a.shape[0]
    if a.shape != (tasks, tasks) or tasks < 1:
        raise ValueError(f"the accuracy matrix must be square with >= 1 task, got shape {tuple(a.shape)}")
    lower = torch.tril(torch.ones(tasks, tasks, dtype=torch.bool))
    out = {
        "final_avg_acc": a[-1].mean().item(),
        "avg_incremental_acc": torch.stack([a[t, : t + 1].mean() for t in range(tasks)]).mean().item(),
    }
    if tasks > 1:
        old = torch.arange(tasks - 1)
        out["bwt"] = (a[-1, old] - a[old, old]).mean().item()
        best = torch.where(lower, a, torch.zeros_like(a)).max(0).values  # max over t >= i of a[t, i]
        out["forgetting"] = (best[old] - a[-1, old]).mean().item()
        if random_init is not None:
            new = torch.arange(1, tasks)
            out["fwt"] = (a[new - 1, new] - random_init.double()[new]).mean().item()
    return out


def save_accuracy_heatmap(matrix: Tensor, path: str | Path, title: str) -> Path:
    """Draw the matrix as an annotated heatmap PNG (rows: after task t, columns: task i); NaN cells (tasks
    not trained yet) stay blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tasks = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * tasks, 0.8 + 0.6 * tasks))
    image = ax.imshow(matrix.float().numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    for t in range(tasks):
        for i in range(tasks):
            value = float(matrix[t, i])
            if value != value:  # NaN: nothing measured yet
                continue
            ax.text(i, t, f"{100 * value:.0f}", ha="center", va="center", fontsize=8,
                    color="black" if value > 0.6 else "white")
    ax.set_xlabel("evaluated task i")
    ax.set_ylabel("after training task t")
    ax.set_xticks(range(tasks))
    ax.set_yticks(range(tasks))
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return save_figure(fig, path)
