"""Several classification tasks at once for model merging and representation surgery.

Two kinds of loaders:
- ``stage: finetune`` — labelled training batches of the task(s), to pre-train the backbone and to
  fine-tune one expert per task (``tasks: [broad]``, ``tasks: [digits]``);
- ``stage: adapt`` — AdaMerging and Surgery adapt on **unlabelled** images of every task at once
  (a ``CombinedLoader`` of ``{task: loader}``; each batch ``{task: {"image", "index", "task"}}``) and
  are evaluated on the labelled images, one validation loader per task. The papers adapt on the test
  split and evaluate on it (transductive, as in AdaMerging/Surgery); ``adapt_split: train`` adapts
  on held-out training images instead.

Every sample carries its task name (``task``) and its index in the split (``index``: the key of the
frozen-model feature caches).

Demo tasks (offline, real data, gray 32x32; :mod:`datamodules.surgery_tasks`): ``broad`` pre-trains
theta_0 (100 classes of glyphs, MNIST digits and photo crops); five expert tasks with labels theta_0
never saw (``glyphs_a``-``glyphs_c``, ``rotation``, ``digits``), each with 150 held-out ``val`` images.
Paper tasks (SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD) are read from ``root/<Task>/{train,test}/<class>/*`` image folders with
CLIP's preprocessing; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.surgery_tasks import DEMO_EXPERT_TASKS, demo_task

PAPER_TASKS = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class TaskDataset(Dataset):
    """Images (and labels) of one task; items are dicts with ``image``, ``index``, ``task`` (and ``label``).

    Args:
        task: task name written into every item.
        images: a (N, C, H, W) tensor, or a dataset of ``(image, label)`` pairs (image folders).
        labels: (N,) labels for a tensor of images.
        labelled: whether items carry their ``label`` (adaptation loaders are unlabelled).
    """

    def __init__(self, task: str = "task", images: Tensor | Dataset | None = None, labels: Tensor | None = None,
                 labelled: bool = True) -> None:
        if images is None or len(images) == 0:
            raise ValueError(f"task {task!r} has no images; check data.init_args.tasks and data.init_args.root")
        self.task, self.images, self.labels, self.labelled = task, images, labels, labelled

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        if isinstance(self.images, Tensor):
            image, label = self.images[i], self.labels[i]
        else:
            image, label = self.images[i]
        item = {"image": image, "index": i, "task": self.task}
        if self.labelled:
            item["label"] = torch.as_tensor(label)
        return item


class SurgeryDataModule(L.LightningDataModule):
    """Labelled and unlabelled loaders for several tasks (demo tasks offline, paper tasks from image folders).

    Args:
        tasks: task names, in order: demo tasks (``broad``, ``glyphs_a``-``glyphs_d``, ``rotation``,
            ``digits``, ``mnist``, ``photos``, ``lfw``; see :mod:`datamodules.surgery_tasks`) or, with
            ``root``, folder names under it (``SUN397``, ``Cars``, ...). Default: the demo's six expert
            tasks.
        stage: ``finetune`` serves labelled training batches of ``tasks``; ``adapt`` serves unlabelled
            batches of every task at once for AdaMerging/Surgery.
        root: directory with ``<Task>/train`` and ``<Task>/test`` image folders (paper tasks); None
            uses the offline demo tasks.
        adapt_split: split adapted on (unlabelled): ``test`` as in the papers (transductive), or
            ``train`` for a held-out protocol. Evaluation always uses ``test``.
        image_size: side of the square images fed to the model.
        head_tasks: ``stage: finetune`` with ``head: joint`` experts: every task whose frozen head is built
            together with this one's (the merged tasks, in one fixed order), read from their training images.
        mean: normalisation mean per channel (CLIP's for image folders).
        std: normalisation std per channel.
        batch_size: training batch size per task (16 in the papers).
        eval_batch_size: evaluation batch size.
        shuffle: shuffle training batches (off only for tests that compare runs batch by batch).
        num_workers: DataLoader workers per loader.
        seed: seed of the demo splits and crops.
    """

    def __init__(
        self,
        tasks: list[str] | None = None,
        stage: Literal["finetune", "adapt"] = "adapt",
        root: str | None = None,
        adapt_split: Literal["test", "train"] = "test",
        image_size: int = 32,
        head_tasks: list[str] | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 256,
        shuffle: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tasks = list(tasks or DEMO_EXPERT_TASKS)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"data.init_args.tasks must list distinct task names, got {self.tasks}")
        if stage == "finetune" and len(self.tasks) != 1:
            raise ValueError(f"data.init_args.tasks: stage 'finetune' trains one task (one expert) at a time, got {self.tasks}")
        if root is not None and not Path(root).is_dir():
            raise FileNotFoundError(f"data.init_args.root: no task folders at {root}; point it to a local copy")
        self.mean = tuple(mean or ((0.5,) if root is None else CLIP_MEAN))
        self.std = tuple(std or ((0.5,) if root is None else CLIP_STD))
        self.splits: dict[str, dict[str, dict[str, Dataset]]] = {}
        self.class_names: dict[str, list[str]] = {}

    def _normalise(self, images: Tensor) -> Tensor:
        return (images - torch.tensor(self.mean).view(1, -1, 1, 1)) / torch.tensor(self.std).view(1, -1, 1, 1)

    def _demo(self, task: str) -> dict[str, dict[str, Dataset]]:
        data = demo_task(task, self.hparams.image_size, self.hparams.seed)
        self.class_names[task] = [str(c) for c in range(int(data["train"][1].max()) + 1)]
        return {split: {mode: TaskDataset(task, self._normalise(x), y, labelled=mode == "labelled")
                        for mode in ("labelled", "unlabelled")} for split, (x, y) in data.items() if len(y)}

    def _folder(self, task: str) -> dict[str, dict[str, Dataset]]:
        from torchvision import datasets, transforms

        size = self.hparams.image_size
        preprocess = transforms.Compose([  # CLIP's val_preprocess: no augmentation anywhere, as in the papers
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(size),
            transforms.Lambda(lambda im: im.convert("RGB")), transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])
        out = {}
        for split in ("train", "test"):
            where = Path(self.hparams.root) / task / split
            if not where.is_dir():
                raise FileNotFoundError(f"data.init_args.root: no {where} (expected <root>/{task}/{split}/<class>/*)")
            folder = datasets.ImageFolder(str(where), transform=preprocess)
            self.class_names[task] = [c.replace("_", " ") for c in folder.classes]
            out[split] = {mode: TaskDataset(task, folder, labelled=mode == "labelled") for mode in ("labelled", "unlabelled")}
        return out

    def setup(self, stage: str | None = None) -> None:
        for task in self.tasks + list(self.hparams.head_tasks or []):
            if task not in self.splits:
                self.splits[task] = self._demo(task) if self.hparams.root is None else self._folder(task)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        hp = self.hparams
        return DataLoader(dataset, batch_size=hp.batch_size if train else hp.eval_batch_size,
                          shuffle=train and hp.shuffle, num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0,
                          drop_last=False)

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        if self.hparams.stage == "finetune":
            return self._loader(self.splits[self.tasks[0]]["train"]["labelled"], train=True)
        split = self.hparams.adapt_split
        loaders = {t: self._loader(self.splits[t][split]["unlabelled"], train=True) for t in self.tasks}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.splits[t]["test"]["labelled"], train=False) for t in self.tasks]

    def head_dataloaders(self) -> dict[str, DataLoader]:
        """Labelled training images of every ``head_tasks`` task, in order (for ``head: joint`` experts)."""
        return {t: self._loader(self.splits[t]["train"]["labelled"], train=False) for t in self.hparams.head_tasks or []}

    def tuning_dataloader(self) -> list[DataLoader]:
        """Labelled held-out training images per task (demo ``val`` split): where merge hyper-parameters
        (task arithmetic's and TIES's lambda) are chosen, disjoint from the test images."""
        missing = [t for t in self.tasks if "val" not in self.splits[t]]
        if missing:
            raise ValueError(f"data.init_args.tasks: {missing} have no held-out validation images")
        return [self._loader(self.splits[t]["val"]["labelled"], train=False) for t in self.tasks]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()
