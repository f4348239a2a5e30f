"""The model zoo of data-free meta-learning (FREE, CVPR 2024; TGR, ICML 2024): N teachers, each a
classifier over a few classes of the meta-train split, trained together in one fit.

Every teacher is a Conv4 (32 channels as both releases) or a ResNet-10/18 (multi-architecture zoos); the
zoo is one ``core.stacked_conv4.StackedConv4`` / ``core.stacked_resnet.StackedResNet`` (grouped
convolutions, per-teacher BatchNorm statistics), so 100 teachers cost one training loop, not 100.
Teacher i only ever sees its own classes' images (the batch is stacked per teacher by
``datamodules.model_zoo.ZooData``). As the release, each teacher keeps the weights of its epoch with
the best held-out accuracy (Conv4: Adam lr 0.01, gradient-norm clip 50 per teacher; ResNets: SGD lr
0.01, momentum 0.9, weight decay 5e-4; the release's step milestones 30/50/80 are not applied). At the
end of fit each teacher is exported as a plain ``core.conv4.Conv4`` / ``core.resnet.ResNet``
safetensors file with a JSON manifest (``core.model_zoo``) that free and tgr load.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from core.model_zoo import ZooTeacher, save_zoo
from core.resnet import DEPTHS
from core.stacked_conv4 import StackedConv4
from core.stacked_resnet import StackedResNet


class ZooModule(L.LightningModule):
    """Train a stacked zoo of teachers and export it.

    Args:
        arch: ``conv4``, ``resnet10`` or ``resnet18``.
        hidden: channels of every Conv4 block.
        width: first-stage channels of a ResNet (release 64).
        in_channels: image channels.
        image_size: image side.
        lr: learning rate (release 0.01).
        optimizer: ``adam`` (release Conv4) or ``sgd`` (momentum 0.9, release ResNets).
        weight_decay: weight decay (release 5e-4 for the ResNets' SGD, 0 for Conv4).
        grad_clip: gradient-norm clip per teacher (release 50; 0: off).
        output_dir: where the zoo is written (default ``<run dir>/zoo``); an existing zoo is never overwritten.
    """

    def __init__(self, arch: str = "conv4", hidden: int = 32, width: int = 64, in_channels: int = 1,
                 image_size: int = 28, lr: float = 0.01, optimizer: str = "adam", weight_decay: float = 0.0,
                 grad_clip: float = 50.0, output_dir: str | None = None) -> None:
        super().__init__()
        if arch != "conv4" and arch not in DEPTHS:
            raise ValueError(f"model.init_args.arch={arch!r}: use conv4, {', '.join(DEPTHS)}")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"model.init_args.optimizer={optimizer!r}: use adam or sgd")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.zoo: StackedConv4 | None = None
        self.manifest: Path | None = None

    def configure_model(self) -> None:
        if self.zoo is not None:
            return
        data = self.trainer.datamodule
        data.prepare_teachers()
        hp = self.hparams
        n, k = data.teacher_classes.shape
        if hp.arch == "conv4":
            self.zoo = StackedConv4(n, hp.in_channels, hp.hidden, k, hp.image_size)
        else:
            self.zoo = StackedResNet(n, hp.arch, hp.in_channels, k, hp.image_size, hp.width)
        self.register_buffer("best_acc", torch.full((n,), -1.0))
        self.best = {name: t.detach().clone() for name, t in self.zoo.per_model_tensors().items()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.zoo.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        return torch.optim.Adam(self.zoo.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)

    def _clip_per_teacher(self) -> None:
        """Clip each teacher's gradient norm separately (the release trains them one by one)."""
        grads = [p.grad.view(self.zoo.n_models, -1) for p in self.zoo.parameters() if p.grad is not None]
        norms = torch.cat(grads, 1).norm(dim=1)
        scale = (self.hparams.grad_clip / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale[:, None])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # (B, N, C, H, W), (B, N)
        logits = self.zoo(x.transpose(0, 1))
        # sum over teachers: each teacher's parameters get exactly its own mean CE gradient
        loss = F.cross_entropy(logits.flatten(0, 1), y.T.flatten(), reduction="none").view(y.shape[1], -1).mean(1).sum()
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        if self.hparams.grad_clip > 0:
            self._clip_per_teacher()
        opt.step()
        self.log("train/loss", loss / y.shape[1], prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._correct = torch.zeros(self.zoo.n_models, device=self.device)
        self._seen = 0

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        pred = self.zoo(x.transpose(0, 1)).argmax(-1)
        self._correct += (pred == y.T).float().sum(1)
        self._seen += y.shape[0]

    def on_validation_epoch_end(self) -> None:
        acc = self._correct / max(self._seen, 1)
        self.log("val/acc", acc.mean())
        if self.trainer.sanity_checking:
            return
        better = acc > self.best_acc  # per teacher: keep its best held-out epoch
        self.best_acc = torch.where(better, acc, self.best_acc)
        for name, t in self.zoo.per_model_tensors().items():
            self.best[name] = torch.where(better[:, None], t.detach(), self.best[name])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["zoo_best"] = self.best  # every teacher's best held-out weights so far

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.best = checkpoint["zoo_best"]

    def best_zoo(self) -> StackedConv4 | StackedResNet:
        """A copy of the zoo holding every teacher's best held-out weights."""
        zoo = copy.deepcopy(self.zoo)
        validated = self.best_acc >= 0  # a teacher never validated keeps its current weights
        with torch.no_grad():
            for name, t in zoo.per_model_tensors().items():
                t.copy_(torch.where(validated[:, None], self.best[name], t))
        return zoo

    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        data, hp = self.trainer.datamodule, self.hparams
        zoo = self.best_zoo()
        out = Path(hp.output_dir) if hp.output_dir else Path(self.trainer.default_root_dir) / "zoo"
        teachers = [ZooTeacher(file="", arch=hp.arch, arch_kwargs=zoo.arch_kwargs(), classes=c.tolist(),
                               class_names=[data.class_names[j] for j in c.tolist()], accuracy=float(a))
                    for c, a in zip(data.teacher_classes, self.best_acc)]
        meta = {"source": data.hparams.source, "split": data.hparams.split, "n_classes": len(data.class_names),
                "class_names": data.class_names, "seed": data.hparams.seed}
        self.manifest = save_zoo(out, [zoo.export(i) for i in range(zoo.n_models)], teachers, meta)
