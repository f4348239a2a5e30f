"""Pictures of SAE Debias runs: probe bias per profession, generated image grids, bias-vs-accuracy sweeps.

Each function writes a PNG and hands it to every logger that can show images (W&B).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _publish(fig: Any, path: Path, key: str, loggers: Sequence[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _figure().close(fig)
    for logger in loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[str(path)])
    return path


def plot_probe(rows: dict[str, dict[str, float]], train: Sequence[str], heldout: Sequence[str], path: Path,
               loggers: Sequence[Any] = ()) -> Path:
    """Grouped bars: embedding-probe P(male) of each profession's neutral prompts, one bar per row."""
    plt = _figure()
    names = list(train) + list(heldout)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(names), 3.2))
    width = 0.8 / len(rows)
    for i, (row, p_male) in enumerate(rows.items()):
        ax.bar(np.arange(len(names)) + i * width, [p_male[n] for n in names], width, label=row)
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.axvline(len(train) - 0.5 + 0.4, color="gray", lw=0.8)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45, ha="right")
    ax.set_ylabel("probe P(male), neutral prompt")
    ax.set_ylim(0, 1)
    ax.set_title("embedding-space gender bias (right of the line: held-out professions)")
    ax.legend(fontsize=7)
    return _publish(fig, path, "test/probe_bias", loggers)


def plot_grid(images: dict[str, np.ndarray], professions: Sequence[str], path: Path,
              loggers: Sequence[Any] = ()) -> Path:
    """Rows: professions; column blocks: settings (``{setting: (P, n, 2, H, W)}`` 2-channel glyph images).

    Channel 0 (profession letter) is drawn in the left half, channel 1 (gender mark) in the right half.
    """
    plt = _figure()
    blocks = list(images)
    n = next(iter(images.values())).shape[1]
    fig, axes = plt.subplots(1, len(blocks), figsize=(1.2 * n * len(blocks), 0.65 * len(professions) + 0.6))
    for ax, block in zip(np.atleast_1d(axes), blocks):
        arr = images[block]  # (P, n, 2, H, W) in [0, 1]
        side = np.concatenate([arr[:, :, 0], arr[:, :, 1]], axis=-1)  # (P, n, H, 2W)
        tiles = np.pad(side, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=0.35)
        ax.imshow(tiles.transpose(0, 2, 1, 3).reshape(tiles.shape[0] * tiles.shape[2], -1), cmap="gray",
                  vmin=0, vmax=1)
        ax.set_title(block, fontsize=9)
        ax.set_yticks((np.arange(len(professions)) + 0.5) * tiles.shape[2], professions, fontsize=7)
        ax.set_xticks([])
    return _publish(fig, path, "test/generated", loggers)


def plot_sweeps(sweeps: dict[str, list[dict[str, float]]], reference: dict[str, float], path: Path,
                loggers: Sequence[Any] = ()) -> Path:
    """Bias vs profession accuracy along each lambda sweep (``[{strength, bias, profession_acc}]``)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for name, points in sweeps.items():
        ax.plot([p["profession_acc"] for p in points], [p["bias"] for p in points], "o-", label=name)
        for p in points:
            ax.annotate(f"{p['strength']:g}", (p["profession_acc"], p["bias"]), fontsize=6)
    for name, point in reference.items():
        ax.plot(point["profession_acc"], point["bias"], "s", label=name)
    ax.set_xlabel("profession accuracy of generated images")
    ax.set_ylabel("gender bias 2|P(male) - 0.5|")
    ax.legend(fontsize=7)
    ax.set_title("held-out professions, lambda annotated")
    return _publish(fig, path, "test/bias_vs_accuracy", loggers)
