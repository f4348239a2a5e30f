"""Data for the Sparse Model Inversion family: real labelled sets and inverted image pools.

The inversion itself needs no data (``SMIModule`` supplies its own step source). This DataModule
serves the stages around it:
- training a teacher on real data (``train_source: real``);
- knowledge transfer and quantisation calibration on inverted images (``train_source: inverted``),
  each with its kept-patch mask so that models compute on the same sparse token set;
- evaluation on real held-out data (val and test splits).

Offline sets (MNIST-5k, sklearn digits) are split deterministically into train/val/test. CIFAR and
ImageNet are read from local roots with torchvision (no download).

Batches are dicts: ``image`` (B, C, H, W) normalised, ``label`` (B,), and for inverted images
``keep_mask`` (B, N_patches) bool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from core.inverted_images import load_inverted_batches

# Per-dataset normalisation (mean, std) used when the config gives none.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist5k": ((0.1307,), (0.3081,)),
    "digits": ((0.3,), (0.4,)),
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
            ship with PyPI packages (offline); ``cifar10``, ``cifar100``, ``imagenet`` read ``root``.
        root: local dataset root for CIFAR (torchvision layout) or ImageNet (``train/`` and ``val/``
            class folders).
        image_size: side of the square images fed to the models (offline sets are resized).
        train_source: ``real`` trains on the dataset's train split; ``inverted`` trains on the
            images written by ``SMIModule`` in ``inverted_dir``.
        inverted_dir: directory of ``batch_*.pt`` files from the inversion.
        num_inverted: image budget taken from ``inverted_dir`` (first N, in batch order); all if None.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size.
        val_size: held-out validation images of the offline sets (class-balanced).
        test_size: held-out test images of the offline sets (class-balanced).
        mean: normalisation mean (default: the dataset's, see ``NORMALISATION``).
        std: normalisation std (default: the dataset's).
        max_shift: random translation (pixels) of the offline training images; 0 disables it.
        num_workers: DataLoader workers.
        seed: seed of the offline splits.
    """

    def __init__(
        self,
        dataset: Literal["mnist5k", "digits", "cifar10", "cifar100", "imagenet"] = "mnist5k",
        root: str | None = None,
        image_size: int = 32,
        train_source: Literal["real", "inverted"] = "real",
        inverted_dir: str | None = None,
        num_inverted: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        val_size: int = 500,
        test_size: int = 1000,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        max_shift: int = 0,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if train_source == "inverted" and not inverted_dir:
            raise ValueError("data.init_args.inverted_dir is required when train_source is 'inverted'")
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
        self.splits = self._offline_splits() if hp.dataset in ("mnist5k", "digits") else self._torchvision_splits()
        if hp.train_source == "inverted":
            pool = load_inverted_batches(hp.inverted_dir, hp.num_inverted)
            if pool["images"].shape[1] != len(self.mean):
                raise ValueError(f"inverted images have {pool['images'].shape[1]} channels, data.mean has {len(self.mean)}")
            self.splits["train"] = TensorDictDataset(
                image=self._normalise(pool["images"]), label=pool["labels"], keep_mask=pool["keep_mask"]
            )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        hp = self.hparams
        size = hp.batch_size if split == "train" else hp.eval_batch_size
        return DataLoader(
            self.splits[split], batch_size=size, shuffle=shuffle, num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
