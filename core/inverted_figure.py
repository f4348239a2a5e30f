"""Figures of inverted image pools: labelled grids, several pools side by side, kept patches outlined.

Each image is drawn large enough to read, titled with its target class (what the inversion asked the
teacher for) and the teacher's prediction on the stored image (green when they agree, red when not);
the patches a sparse inversion kept are outlined, the dropped ones are black.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from core.vit_tokens import patch_mask_to_pixels


def _pick(labels: Tensor, count: int) -> list[int]:
    """Up to ``count`` rows, cycling over the classes so that every class shows."""
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels.tolist()):
        by_class.setdefault(c, []).append(i)
    picked: list[int] = []
    while len(picked) < min(count, len(labels)):
        for rows in by_class.values():
            if rows and len(picked) < count:
                picked.append(rows.pop(0))
    return sorted(picked, key=lambda i: int(labels[i]))


def save_pool_figure(
    pools: dict[str, dict[str, Tensor]], path: str | Path, grid: tuple[int, int], patch_size: int,
    per_pool: int = 16, columns: int = 8,
) -> Path:
    """Draw ``per_pool`` images of every pool (a block of rows per pool) and write a PNG.

    Args:
        pools: name -> record with ``images`` (B, C, H, W) in [0, 1], ``labels`` and ``predictions``
            (B,), ``keep_index`` (B, K).
        path: PNG file to write.
        grid: patch grid (rows, cols); ``(1, 1)`` draws no outline (dense CNN pools).
        patch_size: patch side in pixels.
        per_pool: images drawn from each pool (every class first).
        columns: images per figure row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = {name: _pick(rec["labels"], per_pool) for name, rec in pools.items()}
    rows_per = {name: -(-len(idx) // columns) for name, idx in blocks.items()}
    total_rows = sum(rows_per.values())
    fig, axes = plt.subplots(total_rows, columns, figsize=(1.45 * columns, 1.6 * total_rows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    row = 0
    for name, idx in blocks.items():
        rec = pools[name]
        sparse = grid != (1, 1) and rec["keep_index"].shape[1] < grid[0] * grid[1]
        masks = patch_mask_to_pixels(rec["keep_index"][idx], grid, patch_size)[:, 0] if sparse else None
        for j, i in enumerate(idx):
            ax = axes[row + j // columns, j % columns]
            image = rec["images"][i]
            shown = image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)
            ax.imshow(shown.numpy(), cmap="gray" if image.shape[0] == 1 else None, vmin=0, vmax=1,
                      interpolation="nearest")
            if masks is not None:
                ax.contour(masks[j].float().numpy(), levels=[0.5], colors="#ffb000", linewidths=0.8)
            target, pred = int(rec["labels"][i]), int(rec["predictions"][i])
            ax.set_title(f"target {target} / teacher {pred}", fontsize=7, color="green" if target == pred else "red")
        axes[row, 0].text(-0.15, 0.5, name, transform=axes[row, 0].transAxes, rotation=90, va="center", ha="right",
                          fontsize=10, weight="bold")
        row += rows_per[name]
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
