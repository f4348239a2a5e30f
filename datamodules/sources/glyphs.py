"""Glyphs: a many-class offline image set of printed characters, an offline stand-in for Omniglot/CIFAR-FS.

What it is. A class is a character (digits, Latin, Greek and Cyrillic letters; homoglyphs removed, see
:mod:`.glyph_classes`: 123 classes). An instance is the character in one of the 21 TrueType faces that
ship inside matplotlib (:mod:`.glyph_fonts`), drawn through a seeded random affine map (rotation, scale,
shear, shift) with a random stroke thickening and optional Gaussian noise: white ink on black, uint8, 28
or 32 px (any size), like MNIST. Instances of a class cycle over its faces, so every face appears equally.

Splits (:func:`glyph_splits`) are fixed by a seed and by name, with no class in two splits of one
protocol: ``meta_train`` / ``meta_val`` / ``meta_test`` in CIFAR-FS's 64/16/20 proportions (78/20/25
classes), ``fscil`` (100 classes in order: 60 base, then 40 incremental) and ``pretrain`` (the other 23,
for pre-training backbones that must not have seen the FSCIL classes). Faces split too: ``faces="train"``
leaves out :data:`~.glyph_fonts.HELDOUT_FACES`, ``faces="heldout"`` uses only them.

Limits: printed, not handwritten (the affine and stroke jitter stand in for writers); one channel, no
colour or texture (``channels=3`` repeats the plane for RGB models); Greek, Cyrillic and the Latin
supplement letters come in 16 faces, the basic Latin letters and digits in 21.

Licences: DejaVu (Bitstream Vera licence plus public-domain changes, ``LICENSE_DEJAVU``) and STIX (SIL
Open Font License 1.1, ``LICENSE_STIX``) sit beside the fonts in matplotlib's ``mpl-data/fonts/ttf``;
the Computer Modern faces are the BaKoMa TrueType fonts, under the BaKoMa Fonts Licence (free to copy,
distribute and use; printed in matplotlib's ``LICENSE`` in its dist-info folder). Rendered images are not
font software; the set is generated locally, never redistributed by litzoo.

Rendering is vectorised (one ``grid_sample`` per chunk) and cached as an ``.npz`` under the litzoo cache
(``$LITZOO_CACHE`` or ``~/.cache/litzoo``), keyed by every setting; docs/data.md gives the timings.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from core.packaged_models import default_cache_dir
from core.rng import keyed_generator
from datamodules.sources.glyph_classes import glyph_classes
from datamodules.sources.glyph_fonts import (
    GLYPH_FACES,
    HELDOUT_FACES,
    MASTER_SIZE,
    faces_with,
    font_dir,
    render_master,
)

CACHE_VERSION = 1
"""Bumped whenever rendering changes, so that older cache files are never read."""

SPLIT_NAMES = ("meta_train", "meta_val", "meta_test", "fscil", "pretrain")
FSCIL_CLASSES, FSCIL_BASE = 100, 60
_CHUNK = 2048  # instances per grid_sample call: bounds memory at any set size

FaceSelection = str | Sequence[str]


def _selected_faces(faces: FaceSelection) -> tuple[str, ...]:
    if isinstance(faces, str):
        if faces == "all":
            return GLYPH_FACES
        if faces == "train":
            return tuple(f for f in GLYPH_FACES if f not in HELDOUT_FACES)
        if faces == "heldout":
            return HELDOUT_FACES
        faces = (faces,)
    unknown = [f for f in faces if f not in GLYPH_FACES]
    if unknown or not faces:
        raise ValueError(f"faces={list(faces)!r}: use 'all', 'train', 'heldout' or names from {', '.join(GLYPH_FACES)}")
    return tuple(faces)


def glyph_splits(seed: int = 0) -> dict[str, list[str]]:
    """The named class splits, a pure function of ``seed``.

    Returns:
        ``meta_train``, ``meta_val``, ``meta_test`` (disjoint, 64/16/20 % of the classes, each in class
        order), ``fscil`` (100 classes; the order matters: the first 60 are the base session) and
        ``pretrain`` (every class not in ``fscil``).
    """
    classes = glyph_classes()
    n = len(classes)
    order = torch.randperm(n, generator=keyed_generator(seed, 1)).tolist()
    n_test, n_val = round(0.20 * n), round(0.16 * n)
    n_train = n - n_val - n_test
    pick = lambda idx: [classes[i] for i in sorted(idx)]  # noqa: E731
    fscil = torch.randperm(n, generator=keyed_generator(seed, 2)).tolist()
    return {
        "meta_train": pick(order[:n_train]),
        "meta_val": pick(order[n_train : n_train + n_val]),
        "meta_test": pick(order[n_train + n_val :]),
        "fscil": [classes[i] for i in fscil[:FSCIL_CLASSES]],
        "pretrain": pick(fscil[FSCIL_CLASSES:]),
    }


def _random_affines(n: int, generator: torch.Generator, rotation: float, scale: tuple[float, float],
                    shear: float, shift: float) -> Tensor:
    """(n, 2, 3) sampling matrices for ``affine_grid``: the inverse of rotate . shear . scale, plus a shift."""
    u = torch.rand(n, 5, generator=generator, dtype=torch.float64)
    angle = math.radians(rotation) * (2 * u[:, 0] - 1)
    s = scale[0] + (scale[1] - scale[0]) * u[:, 1]
    k = shear * (2 * u[:, 2] - 1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shr = torch.eye(2, dtype=torch.float64).repeat(n, 1, 1)
    shr[:, 0, 1] = k
    forward = rot @ shr * s.view(n, 1, 1)
    inverse = torch.linalg.inv(forward)
    offset = shift * (2 * u[:, 3:5] - 1)
    return torch.cat([inverse, offset.unsqueeze(-1)], dim=-1).float()


def _render(chars: tuple[str, ...], per_class: int, size: int, faces: tuple[str, ...], seed: int, noise: float,
            stroke: int, rotation: float, scale: tuple[float, float], shear: float, shift: float
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    masters, master_of = [], {}
    label_idx, master_idx, face_idx = [], [], []
    for label, char in enumerate(chars):
        available = faces_with(char, faces)
        if not available:
            raise ValueError(f"glyph source: no selected face has {char!r} (U+{ord(char):04X}); faces={list(faces)}")
        # Instances cycle over the faces in a seeded order: every face appears per_class / len(faces) times.
        order = torch.randperm(len(available), generator=keyed_generator(seed, 3, label)).tolist()
        for j in range(per_class):
            face = available[order[j % len(available)]]
            if (face, char) not in master_of:
                master_of[face, char] = len(masters)
                masters.append(render_master(face, char))
            label_idx.append(label)
            master_idx.append(master_of[face, char])
            face_idx.append(GLYPH_FACES.index(face))
    stack = torch.from_numpy(np.stack(masters)).unsqueeze(1)  # (M, 1, 64, 64)
    n = len(label_idx)
    generator = keyed_generator(seed, 4)
    theta = _random_affines(n, generator, rotation, scale, shear, shift)
    thickening = torch.randint(0, stroke + 1, (n,), generator=generator)
    grain = torch.randn(n, 1, size, size, generator=generator) if noise > 0 else None
    index = torch.tensor(master_idx)
    out = torch.empty(n, size, size, dtype=torch.uint8)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        x = stack[index[lo:hi]]
        # Stroke jitter: 0..stroke rounds of 3x3 dilation at master resolution (1 master px = size/64 px).
        level = thickening[lo:hi].view(-1, 1, 1, 1)
        for r in range(1, stroke + 1):
            x = torch.where(level >= r, F.max_pool2d(x, 3, stride=1, padding=1), x)
        # Resample at twice the target size, then average 2x2: antialiased downscaling.
        grid = F.affine_grid(theta[lo:hi], [hi - lo, 1, 2 * size, 2 * size], align_corners=False)
        y = F.avg_pool2d(F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False), 2)
        if grain is not None:
            y = y + noise * grain[lo:hi]
        out[lo:hi] = (y.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1)
    return out.numpy(), np.asarray(label_idx, dtype=np.int64), np.asarray(face_idx, dtype=np.int64)


def _cache_file(settings: dict) -> Path:
    fonts = font_dir()
    settings = {**settings, "version": CACHE_VERSION, "master": MASTER_SIZE,
                "fonts": [(f, (fonts / f"{f}.ttf").stat().st_size) for f in GLYPH_FACES]}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, ensure_ascii=True).encode()).hexdigest()[:20]
    return default_cache_dir() / "glyphs" / f"{key}.npz"


def _load_or_build(path: Path, build: Callable[[], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    if path.is_file():
        with np.load(path) as data:
            return data["images"], data["labels"], data["faces"]
    arrays = build()
    try:  # atomic: write a temporary file beside the target, then rename; an unwritable cache is skipped
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            np.savez(tmp, images=arrays[0], labels=arrays[1], faces=arrays[2])
        os.replace(tmp.name, path)
    except OSError:
        pass
    return arrays


def render_glyphs(chars: Sequence[str], per_class: int = 20, size: int = 28, faces: FaceSelection = "all",
                  seed: int = 0, noise: float = 0.0, stroke: int = 2, rotation: float = 12.0,
                  scale: tuple[float, float] = (0.85, 1.1), shear: float = 0.2, shift: float = 0.1,
                  cache: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render ``per_class`` instances of every character, deterministically for a given ``seed``.

    Args:
        chars: the classes, in label order (any characters some selected face covers).
        per_class: instances per class; they cycle over the class's faces.
        size: output side in pixels.
        faces: ``"all"``, ``"train"`` (without the held-out faces), ``"heldout"``, or face names.
        seed: seeds the face order, the affine maps, the stroke jitter and the noise.
        noise: standard deviation of additive Gaussian noise on the [0, 1] scale (0: none).
        stroke: maximal rounds of 3x3 dilation at master resolution (the stroke-width jitter).
        rotation: maximal rotation in degrees (uniform in +-rotation).
        scale: range of the isotropic scale.
        shear: maximal horizontal shear factor.
        shift: maximal shift as a fraction of the half-width.
        cache: read and write the ``.npz`` cache (keyed by every argument and the font files).

    Returns:
        ``images`` uint8 (N, size, size), ``labels`` int64 (N,) indexing ``chars``, ``faces`` int64 (N,)
        indexing :data:`~.glyph_fonts.GLYPH_FACES`; N = len(chars) * per_class, grouped by class.
    """
    if per_class < 1 or size < 4:
        raise ValueError(f"render_glyphs: per_class must be >= 1 and size >= 4, got per_class={per_class}, size={size}")
    settings = dict(chars=list(chars), per_class=per_class, size=size, faces=list(_selected_faces(faces)), seed=seed,
                    noise=noise, stroke=stroke, rotation=rotation, scale=list(scale), shear=shear, shift=shift)
    build = functools.partial(_render, tuple(chars), per_class, size, _selected_faces(faces), seed, noise, stroke,
                              rotation, tuple(scale), shear, shift)
    if not cache:
        return build()
    return _load_or_build(_cache_file(settings), build)


class GlyphSet(Dataset):
    """Glyph images as a torchvision-style dataset: ``ds[i] -> (image, label)``.

    Args:
        classes: a split name of :func:`glyph_splits` (``meta_train``, ``meta_val``, ``meta_test``,
            ``fscil``, ``pretrain``), ``"all"`` (every class), or an explicit list of characters.
        per_class: instances per class.
        size: image side in pixels (28 like MNIST, 32 like CIFAR).
        channels: 1, or 3 to repeat the plane for RGB models.
        faces: ``"all"``, ``"train"``, ``"heldout"`` or a list of face names.
        seed: rendering seed (affine maps, stroke jitter, noise).
        noise: additive Gaussian noise std on the [0, 1] scale.
        split_seed: the seed of :func:`glyph_splits` when ``classes`` names a split.
        transform: optional callable applied to the float image tensor.

    Attributes:
        images: uint8 numpy (N, size, size); targets: int64 numpy (N,); classes: list[str] (label order);
        faces: int64 numpy (N,), face ids into :data:`~.glyph_fonts.GLYPH_FACES`.
    """

    def __init__(self, classes: str | Sequence[str] = "meta_train", per_class: int = 20, size: int = 28,
                 channels: int = 1, faces: FaceSelection = "all", seed: int = 0, noise: float = 0.0,
                 split_seed: int = 0, transform: Callable[[Tensor], Tensor] | None = None) -> None:
        if isinstance(classes, str):
            if classes == "all":
                classes = list(glyph_classes())
            elif classes in SPLIT_NAMES:
                classes = glyph_splits(split_seed)[classes]
            else:
                raise ValueError(f"classes={classes!r}: use 'all', one of {', '.join(SPLIT_NAMES)}, or a list of characters")
        if channels not in (1, 3):
            raise ValueError(f"channels={channels}: use 1 (gray) or 3 (the plane repeated for RGB models)")
        self.classes = list(classes)
        self.channels, self.transform = channels, transform
        self.images, self.targets, self.faces = render_glyphs(self.classes, per_class, size, faces, seed, noise)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = torch.from_numpy(self.images[i]).float().div_(255.0).unsqueeze(0)
        if self.channels == 3:
            image = image.expand(3, -1, -1)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[i])

    def tensors(self) -> tuple[Tensor, Tensor]:
        """Every image at once as float (N, channels, size, size) in [0, 1] and int64 labels (N,)."""
        images = torch.from_numpy(self.images).float().div_(255.0).unsqueeze(1)
        return images.expand(-1, self.channels, -1, -1).contiguous(), torch.from_numpy(self.targets)
