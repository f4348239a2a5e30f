"""The offline demo tasks of model merging and representation surgery (real images, gray 32x32, in [0, 1]).

The demo mirrors the papers' regime (a broadly pre-trained CLIP, zero-shot heads, experts fine-tuned
on narrower tasks): ``broad`` pre-trains theta_0 on a wide union of labelled images (78 glyph classes,
the digit classes of one half of MNIST-5k, crops of 12 photographs: 100 classes), and the experts
are fine-tuned on five tasks whose labels theta_0 never saw (``DEMO_EXPERT_TASKS``; their 48
classes fill the 48-d representation, the most that jointly orthonormal heads allow):

- ``glyphs_a`` / ``glyphs_b``: 12 printed characters each (the glyph ``meta_test`` classes, halves);
- ``glyphs_c``: 10 printed characters (the first half of the glyph ``meta_val`` classes; ``glyphs_d``,
  the other half, is available but not merged);
- ``rotation``: the rotation (0/90/180/270 degrees) of the *other* half of MNIST-5k's digits;
- ``digits``: scikit-learn's 8x8 digits, upsampled (a different digit source than MNIST).

The older tasks stay available: ``mnist`` (digit classes of the first MNIST half), ``photos`` (which
of 12 photographs a crop comes from) and ``lfw`` (faces vs non-faces; only 80 test images).
Every task has at least 300 test images except ``lfw``. Splits depend only on ``seed``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DEMO_TASKS = ("broad", "glyphs_a", "glyphs_b", "glyphs_c", "glyphs_d", "rotation", "digits", "mnist", "photos", "lfw")
DEMO_EXPERT_TASKS = ("glyphs_a", "glyphs_b", "glyphs_c", "rotation", "digits")  # merged in the demo: 48 classes
GLYPH_TASKS = {"glyphs_a": ("meta_test", 0, 12), "glyphs_b": ("meta_test", 12, 24),
               "glyphs_c": ("meta_val", 0, 10), "glyphs_d": ("meta_val", 10, 20)}  # split, first, last class
GLYPHS_PER_CLASS = 100  # >= 300 test images for every glyph task (10 or 12 classes), 550-750 to train
VAL_IMAGES = 150  # per expert task, held out of its training images (experts never see them)


def _split(n: int, test: int, val: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Disjoint train / val / test indices; the test indices do not depend on ``val``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[test + val:].sort().values, order[test : test + val].sort().values, order[:test].sort().values


def resize(images: Tensor, size: int) -> Tensor:
    """Bilinear, antialiased resize of (N, C, H, W) images to ``size`` x ``size``, kept in [0, 1]."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def _photo_crops(count: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random square crops (gray, side 48-160 px, resized to ``size``) of 12 real photographs; label = photo."""
    from datamodules import sources

    photos = list(sources.skimage_photos().values()) + list(sources.sklearn_photos().values())
    gen = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for i in range(count):
        label = i % len(photos)
        photo = photos[label].mean(0, keepdim=True)
        side = int(torch.randint(48, min(161, *photo.shape[1:]), (1,), generator=gen))
        y = int(torch.randint(0, photo.shape[1] - side + 1, (1,), generator=gen))
        x = int(torch.randint(0, photo.shape[2] - side + 1, (1,), generator=gen))
        images.append(resize(photo[None, :, y : y + side, x : x + side], size)[0])
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def _mnist_half(which: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """One of two disjoint halves of MNIST-5k (0: the digit-class half, 1: the rotation half)."""
    from datamodules import sources

    images, labels = sources.mnist5k()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    idx = order[:2500] if which == 0 else order[2500:]
    return resize(images[idx], size), labels[idx]


def _glyphs(classes: list[str], per_class: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    from datamodules.sources import GlyphSet

    return GlyphSet(classes, per_class=per_class, size=size, seed=seed).tensors()


def _images(task: str, size: int, seed: int) -> tuple[Tensor, Tensor, int]:
    """All images, labels and the test-set size of one task."""
    from datamodules import sources

    if task in GLYPH_TASKS:
        split, first, last = GLYPH_TASKS[task]
        images, labels = _glyphs(sources.glyph_splits(seed)[split][first:last], GLYPHS_PER_CLASS, size, seed)
        return images, labels, 300
    if task == "broad":  # theta_0's pre-training union: labels 0-77 glyphs, 78-87 MNIST digits, 88-99 photos
        glyph_x, glyph_y = _glyphs(sources.glyph_splits(seed)["meta_train"], 40, size, seed)
        mnist_x, mnist_y = _mnist_half(0, size, seed)
        photo_x, photo_y = _photo_crops(1500, size, seed)
        images, glyphs = torch.cat([glyph_x, mnist_x, photo_x]), int(glyph_y.max()) + 1
        labels = torch.cat([glyph_y, mnist_y + glyphs, photo_y + glyphs + 10])
        return images, labels, 500
    if task == "photos":
        images, labels = _photo_crops(3000, size, seed)
        return images, labels, 500
    if task == "mnist":
        images, labels = _mnist_half(0, size, seed)
        return images, labels, 500
    if task == "rotation":
        images, _ = _mnist_half(1, size, seed)
        labels = torch.randint(0, 4, (len(images),), generator=torch.Generator().manual_seed(seed + 1))
        images = torch.stack([torch.rot90(img, int(k), dims=(1, 2)) for img, k in zip(images, labels)])
        return images, labels, 500
    if task == "digits":
        images, labels = sources.sklearn_digits()
        return resize(images, size), labels, 500
    if task == "lfw":
        images, labels = sources.lfw_subset()
        return resize(images, size), labels, 80
    raise ValueError(f"data.init_args.tasks: unknown demo task {task!r}; choose from {list(DEMO_TASKS)} "
                     "or set data.init_args.root for image folders")


def demo_task(task: str, size: int = 32, seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"train", "val", "test"}: (images, labels)`` of one offline demo task, images in [0, 1].

    ``val`` (``VAL_IMAGES`` held out of the training images; none for ``broad`` and ``lfw``) is where
    merge hyper-parameters such as task arithmetic's lambda are chosen, never on ``test``.
    """
    images, labels, test = _images(task, size, seed)
    val = 0 if task in ("broad", "lfw") else VAL_IMAGES
    parts = dict(zip(("train", "val", "test"), _split(len(labels), test, val, seed)))
    return {name: (images[idx], labels[idx]) for name, idx in parts.items()}
