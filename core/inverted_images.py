"""The on-disk format of inverted image pools, shared by the inversion writer and the data readers.

A pool is one folder. Each batch is ``batch_XXXX.pt`` (a dict of tensors, read back with
``weights_only=True``) and ``batch_XXXX.png`` (a labelled grid for people, see
:mod:`core.inverted_figure`). ``manifest.json`` lists the batch files that belong to the pool and the
settings that produced it; a later stage reads exactly those files (never a glob over the folder, so
a stray or older file is never mixed in). ``README.md`` is the pool's card. The tensor file holds

    images      float32 (B, C, H, W) in [0, 1], dropped patches zeroed
    labels      int64 (B,) target classes of the inversion
    predictions int64 (B,) the teacher's class for the stored image on its kept patches
    keep_index  int64 (B, K) patch positions the inversion computed on (row-major patch grid)
    keep_mask   bool (B, rows * cols)
    patch_size  int64 scalar

Masks are stored explicitly rather than recovered from black pixels (the release's
``find_non_zero_patches`` breaks on kept patches that happen to be black).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.atomic_write import atomic_write_bytes
from core.vit_tokens import patch_mask_to_pixels

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def save_inverted_batch(
    stem: str | Path, images: Tensor, labels: Tensor, keep_index: Tensor, grid: tuple[int, int], patch_size: int,
    predictions: Tensor | None = None,
) -> Path:
    """Write ``stem.pt`` and ``stem.png`` atomically and return the PNG path.

    Args:
        stem: output path without suffix, e.g. ``runs/smi/inverted/batch_0000``.
        images: de-normalised images (B, C, H, W) in [0, 1].
        labels: target labels (B,).
        keep_index: kept patch positions (B, K); for a CNN teacher pass ``grid=(1, 1)`` and zeros.
        grid: patch grid (rows, cols).
        patch_size: patch side in pixels.
        predictions: the teacher's classes for the stored images (default: the labels).
    """
    from core.inverted_figure import save_pool_figure

    stem = Path(stem)
    images = images.detach().float().cpu().clamp(0, 1)
    keep_index = keep_index.detach().cpu().long()
    labels = labels.detach().cpu().long()
    predictions = labels if predictions is None else predictions.detach().cpu().long()
    if grid == (1, 1):
        pixel_mask = torch.ones(images.shape[0], 1, *images.shape[-2:], dtype=torch.bool)
    else:
        pixel_mask = patch_mask_to_pixels(keep_index, grid, patch_size)
    keep_mask = torch.zeros(images.shape[0], grid[0] * grid[1], dtype=torch.bool)
    keep_mask.scatter_(1, keep_index, True)
    record = {"images": images * pixel_mask, "labels": labels, "predictions": predictions,
              "keep_index": keep_index, "keep_mask": keep_mask, "patch_size": torch.tensor(patch_size)}
    buffer = io.BytesIO()
    torch.save(record, buffer)
    atomic_write_bytes(stem.with_suffix(".pt"), buffer.getvalue())
    png = stem.with_suffix(".png")
    save_pool_figure({stem.name: record}, png, grid, patch_size)
    return png


def prepare_pool_dir(directory: str | Path, overwrite: bool, writer: bool, key: str = "output_dir") -> None:
    """Refuse a folder that already holds a pool unless ``overwrite``; then clear it (``writer`` only).

    Args:
        directory: the pool folder about to be written.
        overwrite: remove an earlier pool's files instead of refusing.
        writer: this process deletes files (rank 0); the others only check.
        key: config key named in the error.
    """
    directory = Path(directory)
    old = [directory / MANIFEST, *directory.glob("batch_*.pt"), *directory.glob("batch_*.png")]
    old = [p for p in old if p.exists()]
    if not old:
        return
    if not overwrite:
        raise FileExistsError(
            f"{key}: {directory} already holds an inverted pool ({len(old)} files); choose another folder "
            "or set model.init_args.overwrite: true to replace it"
        )
    if writer:
        for p in old + [directory / "README.md"]:
            p.unlink(missing_ok=True)


def write_manifest(directory: str | Path, batches: list[dict[str, Any]], settings: dict[str, Any]) -> Path:
    """Write ``manifest.json`` (the batch files of the pool and what produced them) and the ``README.md`` card."""
    directory = Path(directory)
    manifest = {"format": "litzoo-smi-inverted-pool", "version": FORMAT_VERSION, "batches": batches,
                "images": sum(b["images"] for b in batches), "settings": settings}
    atomic_write_bytes(directory / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    atomic_write_bytes(directory / "README.md", _card(manifest).encode())
    return directory / MANIFEST


def _card(manifest: dict[str, Any]) -> str:
    s = manifest["settings"]
    kept = sorted({b["kept_patches"] for b in manifest["batches"]})
    lines = [
        "# Inverted image pool (Sparse Model Inversion)", "",
        f"{manifest['images']} images in {len(manifest['batches'])} batches, inverted from the frozen teacher "
        f"`{s['teacher']}` ({s['teacher_checkpoint'] or 'timm weights'}); no real training image was used.", "",
        f"- inversion: {s['iterations']} Adam steps (lr {s['lr']}), CE weight {s['ce_weight']}, "
        f"TV-l2 {s['tv_l2_weight']}, BN prior {s['bn_weight']}, "
        f"patch-similarity prior {s.get('patch_entropy_weight', 0.0)}, labels {s['labels']}, seed {s['seed']}",
        f"- token dropping: events {s['prune_iterations'] or 'none (dense)'}, keep ratios {s['keep_ratios'] or '-'}; "
        f"kept patches per image {kept} of {s['patches']}; returned iterate: {s['return_images']}, "
        f"final mask: {s['final_mask']}",
        f"- pixels in [0, 1], dropped patches black; normalise with mean {s['mean']}, std {s['std']}", "",
        "Files: `batch_XXXX.pt` (tensors: images, labels, predictions, keep_index, keep_mask, patch_size; "
        "load with `torch.load(..., weights_only=True)`), `batch_XXXX.png` (labelled grids), `manifest.json` "
        "(the file list later stages read: `data.init_args.inverted_dir` = this folder).", "",
        "Use: data-free knowledge transfer and post-training quantisation calibration (configs/smi/demo_kd.yaml, "
        "demo_ptq.yaml). Limits: the images carry what the teacher learned, biases included; they are not "
        "natural images and say nothing about data the teacher never saw.", "",
    ]
    return "\n".join(lines)


def load_inverted_pool(path: str | Path, limit: int | None = None, key: str = "inverted_dir") -> dict[str, Tensor]:
    """Concatenate the batches a pool's manifest lists (in order), keeping at most ``limit`` images.

    Args:
        path: the pool folder or its ``manifest.json``.
        limit: image budget (first N); all when None.
        key: config key named in errors.
    """
    path = Path(path)
    manifest_file = path if path.name == MANIFEST else path / MANIFEST
    if not manifest_file.is_file():
        raise FileNotFoundError(
            f"{key}: no {MANIFEST} in {manifest_file.parent}; run the inversion first "
            "(python train.py fit --config configs/smi/demo.yaml) or point it at an inverted pool folder"
        )
    manifest = json.loads(manifest_file.read_text())
    files = [manifest_file.parent / b["file"] for b in manifest["batches"]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise FileNotFoundError(f"{key}: the manifest {manifest_file} lists missing batch files {missing or '(none)'}")
    records = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    out: dict[str, Tensor] = {k: torch.cat([r[k] for r in records]) for k in ("images", "labels", "keep_mask")}
    if limit is not None:
        out = {k: v[:limit] for k, v in out.items()}
    return out
