"""Data for the Sparse Model Inversion family: real labelled sets and inverted image pools.

The inversion itself needs no data (``SMIModule`` supplies its own step source). This DataModule
serves the stages around it:
- training a teacher on real data (``train_source: real``);
- knowledge transfer and quantisation calibration on inverted images (``train_source: inverted``),
  each with its kept patches so that models compute on the same sparse token set, and the floor and
  ceiling of those stages: Gaussian noise (``noise``) and N real training images (``real`` with
  ``num_train``);
- evaluation on real held-out data (val and test splits).

Offline sets (MNIST-5k, sklearn digits) are split deterministically into train/val/test. CIFAR and
ImageNet are read from local roots with torchvision (no download).

Batches are dicts: ``image`` (B, C, H, W) normalised, ``label`` (B,); the pools a downstream stage
trains on (inverted, noise, real with ``num_train``) add ``index`` (B,) (the row in the pool, for caches)
and ``keep_index`` (B, K), the kept patch positions. Rows with the same kept count are batched together
(:class:`_KeptCountBatchSampler`), so a model reads K from the shape and never asks the device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from core.image_priors import clamp_to_pixel_range
from core.inverted_images import load_inverted_pool

# Per-dataset normalisation (mean, std) used when the config gives none.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist5k": ((0.1307,), (0.3081,)),
    "digits": ((0.3,), (0.4,)),
    "glyphs": ((0.1307,), (0.3081,)),  # MNIST's: a glyph-pretrained student reads the teacher's inputs
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class TensorDictDataset(Dataset):
    """Rows of equally long tensors, returned as dicts."""

    def __init__(self, **columns: Tensor) -> None:
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns differ in length: { {k: len(v) for k, v in columns.items()} }")
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


class PoolDataset(Dataset):
    """A training pool of images with the patches each one computes on.

    Args:
        images: normalised images (N, C, H, W).
        labels: labels (N,) (targets of the inversion; unused by distillation).
        keep_mask: bool (N, N_patches); all True for dense images.
    """

    def __init__(self, images: Tensor, labels: Tensor, keep_mask: Tensor) -> None:
        self.images, self.labels, self.keep_mask = images, labels, keep_mask
        self.keep_index = [row.nonzero().squeeze(1) for row in keep_mask]  # once, at setup
        self.counts = keep_mask.sum(1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": self.images[i], "label": self.labels[i], "keep_index": self.keep_index[i],
                "index": torch.tensor(i)}


class _KeptCountBatchSampler(Sampler[list[int]]):
    """Shuffled batches whose rows share one kept-patch count (a pool may mix sparsity levels).

    Args:
        counts: kept count per row (N,).
        batch_size: rows per batch.
        shuffle: reshuffle rows and batch order every epoch (seeded by ``seed`` and the epoch).
        seed: base seed of the shuffling.
    """

    def __init__(self, counts: Tensor, batch_size: int, shuffle: bool = True, seed: int = 0) -> None:
        self.counts, self.batch_size, self.shuffle, self.seed, self.epoch = counts, batch_size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.counts), generator=gen) if self.shuffle else torch.arange(len(self.counts))
        batches = []
        for count in self.counts.unique().tolist():
            rows = order[self.counts[order] == count].tolist()
            batches += [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return batches

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


class _Normalised(Dataset):
    """A torchvision dataset of (PIL image, label) as dicts of normalised tensors."""

    def __init__(self, base: Dataset, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        image, label = self.base[i]
        return {"image": self.transform(image), "label": torch.tensor(label)}


class RandomShift(Dataset):
    """Random translation by up to ``max_shift`` pixels per axis, uncovered pixels set to ``fill``.

    Teachers trained with it tolerate the jitter that model inversion applies to its images.

    Args:
        base: dataset of dicts with an ``image`` (C, H, W).
        max_shift: largest shift in pixels along each axis.
        fill: per-channel value of the uncovered pixels (the normalised background).
    """

    def __init__(self, base: Dataset, max_shift: int, fill: Tensor) -> None:
        self.base, self.max_shift, self.fill = base, max_shift, fill.view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        row = dict(self.base[i])
        image, s = row["image"], self.max_shift
        dy, dx = torch.randint(-s, s + 1, (2,)).tolist()
        padded = self.fill.expand(image.shape[0], image.shape[1] + 2 * s, image.shape[2] + 2 * s).clone()
        padded[:, s : s + image.shape[1], s : s + image.shape[2]] = image
        row["image"] = padded[:, s + dy : s + dy + image.shape[1], s + dx : s + dx + image.shape[2]]
        return row


def stratified_split(labels: Tensor, sizes: tuple[int, int], seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Indices (rest, first, second) with ``sizes`` drawn class-balanced by a seeded permutation."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    classes = labels.unique()
    picked: list[list[Tensor]] = [[], []]
    taken = torch.zeros(len(labels), dtype=torch.bool)
    for part, size in enumerate(sizes):
        per_class = size // len(classes)
        for c in classes:
            idx = order[(labels[order] == c) & ~taken[order]][:per_class]
            taken[idx] = True
            picked[part].append(idx)
    first, second = (torch.cat(p).sort().values for p in picked)
    return (~taken).nonzero().squeeze(1), first, second


class SMIDataModule(L.LightningDataModule):
    """Real data and inverted image pools for the SMI stages.

    Args:
        dataset: real dataset for training teachers and for evaluation: ``mnist5k`` and ``digits``
            ship with PyPI packages, ``glyphs`` (all 122 printed-character classes, white on black
            like MNIST) is rendered from matplotlib's fonts (offline); ``cifar10``, ``cifar100``,
            ``imagenet`` read ``root``.
        root: local dataset root for CIFAR (torchvision layout) or ImageNet (``train/`` and ``val/``
            class folders).
        image_size: side of the square images fed to the models (offline sets are resized).
        train_source: ``real`` trains on the dataset's train split (the first ``num_train`` images
            of it as a pool when ``num_train`` is set: the ceiling of the data-free stages);
            ``inverted`` on the pool ``SMIModule`` wrote to ``inverted_dir``; ``noise`` on
            ``num_train`` Gaussian images N(0, I) in normalised space (the floor; release ``--mode 1``).
        inverted_dir: an inverted pool folder (or its ``manifest.json``); only the batch files its
            manifest lists are read.
        num_inverted: image budget taken from ``inverted_dir`` (first N, in batch order); all if None.
        num_train: image budget of ``real`` (a random subset of the train split) and ``noise``.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size.
        val_size: held-out validation images of the offline sets (class-balanced).
        test_size: held-out test images of the offline sets (class-balanced).
        mean: normalisation mean (default: the dataset's, see ``NORMALISATION``).
        std: normalisation std (default: the dataset's).
        max_shift: random translation (pixels) of the offline training images; 0 disables it.
        patch_size: the models' patch side, to mark every patch of a noise or real pool as kept.
        glyphs_per_class: rendered instances per glyph class (``dataset: glyphs``).
        num_workers: DataLoader workers.
        seed: seed of the offline splits.
        pool_seed: seed of the noise draw and of the real subset of ``num_train`` images (the splits
            stay fixed by ``seed``).
    """

    def __init__(
        self,
        dataset: Literal["mnist5k", "digits", "glyphs", "cifar10", "cifar100", "imagenet"] = "mnist5k",
        root: str | None = None,
        image_size: int = 32,
        train_source: Literal["real", "inverted", "noise"] = "real",
        inverted_dir: str | None = None,
        num_inverted: int | None = None,
        num_train: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        val_size: int = 500,
        test_size: int = 1000,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        max_shift: int = 0,
        patch_size: int = 4,
        glyphs_per_class: int = 40,
        num_workers: int = 0,
        seed: int = 0,
        pool_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if train_source == "inverted" and not inverted_dir:
            raise ValueError("data.init_args.inverted_dir is required when train_source is 'inverted'")
        if train_source == "noise" and not num_train:
            raise ValueError("data.init_args.num_train (how many noise images) is required when train_source is 'noise'")
        if dataset in ("cifar10", "cifar100", "imagenet") and not root:
            raise ValueError(f"data.init_args.root must point to a local {dataset} copy (no downloads)")
        if root and not Path(root).is_dir():
            raise FileNotFoundError(f"data.init_args.root: no {dataset} at {root}; point it to a local copy")
        default_mean, default_std = NORMALISATION[dataset]
        self.mean = tuple(mean or default_mean)
        self.std = tuple(std or default_std)
        self.splits: dict[str, Dataset] = {}

    def _normalise(self, images: Tensor) -> Tensor:
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (images - mean) / std

    def _offline_splits(self) -> dict[str, Dataset]:
        from datamodules import sources

        hp = self.hparams
        if hp.dataset == "glyphs":
            images, labels = sources.GlyphSet("all", per_class=hp.glyphs_per_class, size=hp.image_size).tensors()
        else:
            images, labels = sources.mnist5k() if hp.dataset == "mnist5k" else sources.sklearn_digits()
        if images.shape[-1] != hp.image_size:
            images = F.interpolate(images, size=hp.image_size, mode="bilinear", antialias=True, align_corners=False)
        images = self._normalise(images.clamp(0, 1))
        train, val, test = stratified_split(labels, (hp.val_size, hp.test_size), hp.seed)
        splits: dict[str, Dataset] = {
            name: TensorDictDataset(image=images[idx], label=labels[idx])
            for name, idx in (("train", train), ("val", val), ("test", test))
        }
        if hp.max_shift:
            background = self._normalise(torch.zeros(1, len(self.mean), 1, 1)).flatten()
            splits["train"] = RandomShift(splits["train"], hp.max_shift, background)
        return splits

    def _torchvision_splits(self) -> dict[str, Dataset]:
        from torchvision import datasets, transforms

        hp = self.hparams
        size = hp.image_size
        resize = int(round(size / 0.875))  # DeiT evaluation: resize to size/0.875, centre crop
        evaluate = transforms.Compose([
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(self.mean, self.std),
        ])
        train = transforms.Compose([
            transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(self.mean, self.std),
        ])
        try:
            if hp.dataset == "imagenet":
                train_set = datasets.ImageFolder(f"{hp.root}/train")
                test_set = datasets.ImageFolder(f"{hp.root}/val")
            else:
                cls = datasets.CIFAR10 if hp.dataset == "cifar10" else datasets.CIFAR100
                train_set = cls(hp.root, train=True, download=False)
                test_set = cls(hp.root, train=False, download=False)
        except (FileNotFoundError, RuntimeError) as err:
            raise FileNotFoundError(f"data.init_args.root: no {hp.dataset} at {hp.root} ({err})") from err
        # Paper protocol: evaluate on the official test/val split; there is no separate val split.
        return {
            "train": _Normalised(train_set, train),
            "val": _Normalised(test_set, evaluate),
            "test": _Normalised(test_set, evaluate),
        }

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        self.splits = self._offline_splits() if hp.dataset in ("mnist5k", "digits", "glyphs") else self._torchvision_splits()
        if hp.train_source == "inverted":
            pool = load_inverted_pool(hp.inverted_dir, hp.num_inverted, key="data.init_args.inverted_dir")
            if pool["images"].shape[1] != len(self.mean):
                raise ValueError(f"inverted images have {pool['images'].shape[1]} channels, data.mean has {len(self.mean)}")
            self.splits["train"] = PoolDataset(self._normalise(pool["images"]), pool["labels"], pool["keep_mask"])
        elif hp.train_source == "noise" or hp.num_train:
            self.splits["train"] = self._floor_or_ceiling_pool()

    def _floor_or_ceiling_pool(self) -> PoolDataset:
        """``num_train`` noise images or real training images, all patches kept."""
        hp = self.hparams
        if hp.train_source == "noise":
            train = self.splits["val"][0]["image"]
            gen = torch.Generator().manual_seed(hp.pool_seed)
            images = torch.randn(hp.num_train, *train.shape, generator=gen)
            clamp_to_pixel_range(images, torch.tensor(self.mean), torch.tensor(self.std))
            labels = torch.full((hp.num_train,), -1)
        else:
            base = self.splits["train"]
            base = base.base if isinstance(base, RandomShift) else base  # a pool is not augmented
            if hp.num_train > len(base):
                raise ValueError(f"data.init_args.num_train: {hp.num_train} exceeds the {len(base)} training images")
            picked = torch.randperm(len(base), generator=torch.Generator().manual_seed(hp.pool_seed))[: hp.num_train]
            rows = [base[i] for i in picked.tolist()]
            images, labels = torch.stack([r["image"] for r in rows]), torch.stack([r["label"] for r in rows])
        return PoolDataset(images, labels, torch.ones(len(images), self._num_patches(images), dtype=torch.bool))

    def _num_patches(self, images: Tensor) -> int:
        side = self.hparams.patch_size
        return (images.shape[-2] // side) * (images.shape[-1] // side)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        hp = self.hparams
        size = hp.batch_size if split == "train" else hp.eval_batch_size
        data = self.splits[split]
        if isinstance(data, PoolDataset):
            sampler = _KeptCountBatchSampler(data.counts, size, shuffle, hp.seed)
            return DataLoader(data, batch_sampler=sampler, num_workers=hp.num_workers,
                              persistent_workers=hp.num_workers > 0)
        return DataLoader(data, batch_size=size, shuffle=shuffle, num_workers=hp.num_workers,
                          persistent_workers=hp.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
