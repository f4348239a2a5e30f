"""Labelled class splits for few-shot learning and model zoos: the glyph source, smoke sources and folders.

``labelled_split(source, split, ...)`` returns ``(images, labels, class_names)`` with images float in
[0, 1] of shape (N, C, size, size) and labels the index of the class within the split. Sources:

- ``glyphs``: printed characters from the fonts inside matplotlib (``datamodules.sources.GlyphSet``),
  splits ``meta_train``/``meta_val``/``meta_test`` (CIFAR-FS proportions).
- ``mnist5k`` / ``digits``: ten classes only, for smoke tests: ``meta_train`` = digits 0-4,
  ``meta_val`` and ``meta_test`` = digits 5-9 (disjoint halves of their images).
- ``folder``: ``root/<split>/<class>/<image>`` (CIFAR-FS, MiniImageNet, CUB in the standard layout).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

SPLITS = ("meta_train", "meta_val", "meta_test")
SOURCES = ("glyphs", "mnist5k", "digits", "folder")


def _resize(images: Tensor, size: int, channels: int) -> Tensor:
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    if images.shape[1] != channels:
        images = images.mean(1, keepdim=True).expand(-1, channels, -1, -1) if channels in (1, 3) else images
    return images.contiguous()


def _ten_classes(images: Tensor, labels: Tensor, split: str) -> tuple[Tensor, Tensor, list[str]]:
    if split == "meta_train":
        keep = labels < 5
        return images[keep], labels[keep], [str(c) for c in range(5)]
    keep = labels >= 5
    images, labels = images[keep], labels[keep] - 5
    rank = torch.zeros_like(labels)
    for c in range(5):  # the c-th image of each class alternates between meta_val and meta_test
        rank[labels == c] = torch.arange(int((labels == c).sum()))
    half = (rank % 2 == 0) if split == "meta_val" else (rank % 2 == 1)
    return images[half], labels[half], [str(c + 5) for c in range(5)]


def _folder(root: str, split: str, size: int, per_class: int) -> tuple[Tensor, Tensor, list[str]]:
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    directory = Path(root) / split
    if not directory.is_dir():
        raise FileNotFoundError(f"data.init_args.root={root}: no {split}/ folder (expected root/<split>/<class>/*.png|jpg)")
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
    images, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (directory / name).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        for file in files[:per_class] if per_class else files:
            img = Image.open(file).convert("RGB").resize((size, size))
            images.append(pil_to_tensor(img).float() / 255)
            labels.append(c)
    if not images:
        raise FileNotFoundError(f"data.init_args.root={root}: {directory} holds no images")
    return torch.stack(images), torch.tensor(labels), classes


def labelled_split(source: str, split: str, per_class: int = 20, size: int = 28, channels: int = 1,
                   seed: int = 0, root: str | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """Images (N, C, size, size) in [0, 1], labels (N,) within the split, and the split's class names."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {', '.join(SPLITS)}")
    if source == "glyphs":
        from datamodules.sources import GlyphSet

        ds = GlyphSet(classes=split, per_class=per_class, size=size, channels=1, seed=seed)
        images = torch.as_tensor(ds.images).float().div(255)[:, None]
        return _resize(images, size, channels), torch.as_tensor(ds.targets).long(), list(ds.classes)
    if source in ("mnist5k", "digits"):
        from datamodules.sources import mnist5k, sklearn_digits

        images, labels = mnist5k() if source == "mnist5k" else sklearn_digits()
        images, labels, names = _ten_classes(images, labels, split)
        if per_class:
            keep = torch.zeros_like(labels, dtype=torch.bool)
            for c in range(5):
                keep[torch.nonzero(labels == c).flatten()[:per_class]] = True
            images, labels = images[keep], labels[keep]
        return _resize(images, size, channels), labels, names
    if source == "folder":
        if not root:
            raise ValueError("data.init_args.root is required for source=folder (root/<split>/<class>/...)")
        images, labels, names = _folder(root, split, size, per_class)
        return _resize(images, size, channels), labels, names
    raise ValueError(f"data.init_args.source={source!r}: use one of {', '.join(SOURCES)}")


class EpisodeSet(Dataset):
    """Fixed episodes over a labelled set: item e is ``(support (n_way, k, C, H, W), query (n_way, q, C, H, W))``.

    Args:
        images: (N, C, H, W) images.
        indices: (E, n_way, k + q) dataset indices from ``core.episodes.sample_episodes``.
        k_shot: support images per class (the first ``k_shot`` along the last axis of ``indices``).
    """

    def __init__(self, images: Tensor, indices: Tensor, k_shot: int) -> None:
        self.images, self.indices, self.k_shot = images, indices, k_shot

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, e: int) -> tuple[Tensor, Tensor]:
        x = self.images[self.indices[e]]
        return x[:, : self.k_shot], x[:, self.k_shot:]
