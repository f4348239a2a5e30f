"""The on-disk format of inverted image batches, shared by the inversion writer and the data readers.

One batch is two files: ``batch_XXXX.pt`` (a dict of tensors, read back with ``weights_only=True``)
and ``batch_XXXX.png`` (a grid for people, dropped patches black). The tensor file holds

    images      float32 (B, C, H, W) in [0, 1], dropped patches zeroed
    labels      int64 (B,) target classes of the inversion
    keep_index  int64 (B, K) patch positions the inversion computed on (row-major patch grid)
    keep_mask   bool (B, rows * cols)
    patch_size  int64 scalar

Masks are stored explicitly rather than recovered from black pixels (the release's
``find_non_zero_patches`` breaks on kept patches that happen to be black).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from core.vit_tokens import patch_mask_to_pixels


def save_inverted_batch(
    stem: str | Path, images: Tensor, labels: Tensor, keep_index: Tensor, grid: tuple[int, int], patch_size: int
) -> Path:
    """Write ``stem.pt`` and ``stem.png`` atomically and return the PNG path.

    Args:
        stem: output path without suffix, e.g. ``runs/smi/inverted/batch_0000``.
        images: de-normalised images (B, C, H, W) in [0, 1].
        labels: target labels (B,).
        keep_index: kept patch positions (B, K); for a CNN teacher pass ``grid=(1, 1)`` and zeros.
        grid: patch grid (rows, cols).
        patch_size: patch side in pixels.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    images = images.detach().float().cpu().clamp(0, 1)
    keep_index = keep_index.detach().cpu()
    if grid == (1, 1):
        pixel_mask = torch.ones(images.shape[0], 1, *images.shape[-2:], dtype=torch.bool)
    else:
        pixel_mask = patch_mask_to_pixels(keep_index, grid, patch_size)
    masked = images * pixel_mask
    keep_mask = torch.zeros(images.shape[0], grid[0] * grid[1], dtype=torch.bool)
    keep_mask.scatter_(1, keep_index, True)
    record = {
        "images": masked,
        "labels": labels.detach().cpu().long(),
        "keep_index": keep_index.long(),
        "keep_mask": keep_mask,
        "patch_size": torch.tensor(patch_size),
    }
    tmp = stem.with_suffix(".pt.tmp")
    torch.save(record, tmp)
    tmp.replace(stem.with_suffix(".pt"))
    png = stem.with_suffix(".png")
    save_image(make_grid(masked, nrow=int(max(1, images.shape[0] ** 0.5)), padding=1), png)
    return png


def load_inverted_batches(directory: str | Path, limit: int | None = None) -> dict[str, Tensor]:
    """Concatenate every ``batch_*.pt`` in ``directory`` (sorted), keeping at most ``limit`` images."""
    files = sorted(Path(directory).glob("batch_*.pt"))
    if not files:
        raise FileNotFoundError(
            f"no inverted batches (batch_*.pt) in {directory}; run the inversion first "
            "(python train.py fit --config configs/smi/demo.yaml) or fix data.init_args.inverted_dir"
        )
    records = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    out: dict[str, Tensor] = {
        "images": torch.cat([r["images"] for r in records]),
        "labels": torch.cat([r["labels"] for r in records]),
        "keep_mask": torch.cat([r["keep_mask"] for r in records]),
    }
    if limit is not None:
        out = {k: v[:limit] for k, v in out.items()}
    return out
