"""Few-shot class-incremental learning (FSCIL) pieces: class prototypes and the per-session metrics.

Session ``t`` evaluates on the test images of every class seen so far (base classes + sessions 1..t).
From the correct counts ``correct[t, i]`` (after session ``t``, on the test images of session ``i``'s
classes) and the test counts ``count[i]``:

- session accuracy     acc_t = sum_{i<=t} correct[t, i] / sum_{i<=t} count[i]
- average accuracy     AA = mean_t acc_t
- performance drop     PD = acc_0 - acc_{T-1}
- harmonic mean        HM_t = 2 old_t new_t / (old_t + new_t), old_t = accuracy on the base classes,
                       new_t = accuracy on the classes of sessions 1..t (from session 1 on)

Deviation: the ASP release averages accuracies of consecutive groups of ``increment`` classes
(``utils/toolkit.py``) before the harmonic mean; with the same number of test images per class that is the
sample-weighted accuracy used here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from core.figures import save_figure


def class_means(features: Tensor, labels: Tensor, classes: Tensor) -> Tensor:
    """Mean feature of each class in ``classes`` (K,) as a (K, D) tensor; a class without examples is an error."""
    onehot = (labels[:, None] == classes[None, :]).to(features.dtype)  # (N, K)
    counts = onehot.sum(0)
    if bool((counts == 0).any()):
        missing = classes[counts == 0].tolist()
        raise ValueError(f"no training examples of classes {missing}: check the session plan (data.init_args)")
    return (onehot.T @ features) / counts[:, None]


def fscil_metrics(correct: Tensor, count: Tensor) -> dict[str, list[float] | float]:
    """Per-session accuracy, AA, PD and HM from ``correct`` (T, T) and ``count`` (T,) (see the module doc)."""
    correct, count = correct.double(), count.double()
    sessions = correct.shape[0]
    if correct.shape != (sessions, sessions) or count.shape != (sessions,) or sessions < 1:
        raise ValueError(f"correct must be (T, T) and count (T,), got {tuple(correct.shape)} and {tuple(count.shape)}")
    seen = torch.tril(torch.ones(sessions, sessions, dtype=torch.bool))
    acc = (correct * seen).sum(1) / (count * seen).sum(1)
    old = correct[:, 0] / count[0]
    new_correct, new_count = (correct * seen)[:, 1:].sum(1), (count[1:] * seen[:, 1:]).sum(1)
    new = torch.where(new_count > 0, new_correct / new_count.clamp_min(1), torch.zeros_like(new_correct))
    hm = torch.where(old + new > 0, 2 * old * new / (old + new).clamp_min(1e-12), torch.zeros_like(old))
    return {
        "sessions": acc.tolist(),
        "avg": acc.mean().item(),
        "pd": (acc[0] - acc[-1]).item(),
        "old": old[1:].tolist(),
        "new": new[1:].tolist(),
        "hm_sessions": hm[1:].tolist(),
        "hm": hm[-1].item() if sessions > 1 else float("nan"),
    }


def save_session_curves(curves: dict[str, list[float]], path: str | Path, title: str) -> Path:
    """Draw accuracy (fraction) per session for each named curve as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, values in curves.items():
        ax.plot(range(len(values)), [100 * v for v in values], marker="o", label=name)
    ax.set_xlabel("session")
    ax.set_ylabel("top-1 accuracy on seen classes (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
