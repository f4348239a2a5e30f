"""The model zoo of data-free meta-learning (FREE, CVPR 2024; TGR, ICML 2024): N teachers, each a
classifier over a few classes of the meta-train split, trained together in one fit.

Every teacher is a Conv4 (32 channels as both releases); the zoo is one ``core.stacked_conv4.StackedConv4``
(grouped convolutions, per-teacher BatchNorm statistics), so 100 teachers cost one training loop, not
100. Teacher i only ever sees its own classes' images (the batch is stacked per teacher by
``datamodules.model_zoo.ZooData``). As the release, each teacher keeps the weights of its epoch with
the best held-out accuracy (Adam lr 0.01, gradient-norm clip 50 per teacher). At the end of fit each
teacher is exported as a plain ``core.conv4.Conv4`` safetensors file with a JSON manifest
(``core.model_zoo``) that free and tgr load.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from core.model_zoo import ZooTeacher, save_zoo
from core.stacked_conv4 import StackedConv4


class ZooModule(L.LightningModule):
    """Train a stacked zoo of Conv4 teachers and export it.

    Args:
        hidden: channels of every Conv4 block.
        in_channels: image channels.
        image_size: image side.
        lr: Adam learning rate (release 0.01).
        grad_clip: gradient-norm clip per teacher (release 50; 0: off).
        output_dir: where the zoo is written (default ``<run dir>/zoo``); an existing zoo is never overwritten.
    """

    def __init__(self, hidden: int = 32, in_channels: int = 1, image_size: int = 28, lr: float = 0.01,
                 grad_clip: float = 50.0, output_dir: str | None = None) -> None:
        super().__init__()
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
        self.zoo = StackedConv4(n, hp.in_channels, hp.hidden, k, hp.image_size)
        self.register_buffer("best_acc", torch.full((n,), -1.0))
        self.best = {name: t.detach().clone() for name, t in self.zoo.per_model_tensors().items()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.zoo.parameters(), lr=self.hparams.lr)

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

    def best_zoo(self) -> StackedConv4:
        """A copy of the zoo holding every teacher's best held-out weights."""
        zoo = StackedConv4(self.zoo.n_models, self.zoo.in_channels, self.zoo.hidden, self.zoo.num_classes,
                           self.zoo.image_size).to(self.device)
        zoo.load_state_dict(self.zoo.state_dict())
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
        arch_kwargs = {"in_channels": hp.in_channels, "hidden": hp.hidden, "num_classes": zoo.num_classes,
                       "image_size": hp.image_size}
        teachers = [ZooTeacher(file="", arch="conv4", arch_kwargs=arch_kwargs, classes=c.tolist(),
                               class_names=[data.class_names[j] for j in c.tolist()], accuracy=float(a))
                    for c, a in zip(data.teacher_classes, self.best_acc)]
        meta = {"source": data.hparams.source, "split": data.hparams.split, "n_classes": len(data.class_names),
                "class_names": data.class_names, "seed": data.hparams.seed}
        self.manifest = save_zoo(out, [zoo.export(i) for i in range(zoo.n_models)], teachers, meta)
