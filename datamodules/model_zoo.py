"""Training data of a model zoo: teacher i sees only its own ``classes_per_teacher`` classes.

The classes of teacher i are drawn from the split (``meta_train``) with a keyed generator and recorded
(``teacher_classes``; labels are positions in that list, as the FREE/TGR release). Per class the first
``train_fraction`` of the images train, the rest measure held-out accuracy. A batch stacks every
teacher's own images: ``(x (B, N, C, H, W), y (B, N))``, ready for ``core.stacked_conv4.StackedConv4``.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from core.rng import keyed_generator
from datamodules.few_shot import labelled_split


class _StackedSet(Dataset):
    def __init__(self, images: Tensor, index: Tensor, labels: Tensor) -> None:
        self.images, self.index, self.labels = images, index, labels  # index/labels (N, M)

    def __len__(self) -> int:
        return self.index.shape[1]

    def __getitem__(self, j: int) -> tuple[Tensor, Tensor]:
        return self.images[self.index[:, j]], self.labels[:, j]


class ZooData(L.LightningDataModule):
    """Per-teacher training and held-out images, stacked over teachers.

    Args:
        source: ``glyphs``, ``mnist5k``, ``digits`` or ``folder`` (see ``datamodules.few_shot``).
        root: dataset root for ``source: folder``.
        split: the split the teachers learn from.
        image_size: side of the images.
        channels: image channels.
        per_class: images per class (the glyph renderer's count; 0: all, for folders).
        n_teachers: zoo size N.
        classes_per_teacher: classes of each teacher (release 5).
        train_fraction: share of each class's images used for training (release 0.8).
        batch_size: images per teacher per step (release 128).
        seed: seed of the class draw.
        probe_classes: the last this many classes of the split are left out of every teacher's draw
            (reserved for TGR's task-embedding probe, ``datamodules.tgr.TGRData``); 0 uses all.
    """

    def __init__(self, source: str = "glyphs", root: str | None = None, split: str = "meta_train",
                 image_size: int = 28, channels: int = 1, per_class: int = 20, n_teachers: int = 20,
                 classes_per_teacher: int = 5, train_fraction: float = 0.8, batch_size: int = 32,
                 seed: int = 0, probe_classes: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.teacher_classes: Tensor | None = None
        self.class_names: list[str] = []
        self.sets: dict[str, _StackedSet] = {}

    def prepare_teachers(self) -> None:
        """Load the split and draw every teacher's classes (idempotent)."""
        if self.teacher_classes is not None:
            return
        hp = self.hparams
        images, labels, self.class_names = labelled_split(hp.source, hp.split, hp.per_class, hp.image_size,
                                                          hp.channels, hp.seed, hp.root)
        n_classes = len(self.class_names)
        drawable = n_classes - hp.probe_classes
        if hp.classes_per_teacher > drawable:
            raise ValueError(f"data.init_args.classes_per_teacher={hp.classes_per_teacher} but {hp.source}/"
                             f"{hp.split} has {n_classes} classes ({hp.probe_classes} reserved by probe_classes)")
        g = keyed_generator(hp.seed, 7)
        self.teacher_classes = torch.stack([torch.randperm(drawable, generator=g)[: hp.classes_per_teacher]
                                            for _ in range(hp.n_teachers)])
        counts = torch.bincount(labels, minlength=n_classes)
        per = int(counts.min())  # equal counts per class so every teacher's stack has the same length
        n_train = int(round(per * hp.train_fraction))
        if n_train < 1 or n_train == per:
            raise ValueError(f"data.init_args.train_fraction={hp.train_fraction} leaves no train or held-out "
                             f"image of the {per} per class")
        order = torch.argsort(labels, stable=True).view(n_classes, -1)[:, :per] if bool((counts == per).all()) \
            else torch.stack([torch.nonzero(labels == c).flatten()[:per] for c in range(n_classes)])
        self.images = images
        for name, cols in (("train", slice(0, n_train)), ("val", slice(n_train, per))):
            idx = order[self.teacher_classes][:, :, cols]  # (N, classes_per_teacher, m)
            rel = torch.arange(hp.classes_per_teacher)[None, :, None].expand_as(idx)
            self.sets[name] = _StackedSet(images, idx.flatten(1), rel.flatten(1))

    def setup(self, stage: str) -> None:
        self.prepare_teachers()

    def train_dataloader(self) -> DataLoader:
        g = keyed_generator(self.hparams.seed, 8)
        return DataLoader(self.sets["train"], batch_size=self.hparams.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["val"], batch_size=256)
