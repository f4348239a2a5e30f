"""Supervised training of an image classifier: the teacher stage of the SMI demo.

Sparse Model Inversion starts from a trained teacher. Offline there are no ImageNet weights, so the
demo first trains a small timm ViT on real MNIST-5k with this module and exports it as safetensors;
``SMIModule`` then loads it through ``teacher_checkpoint``. On a GPU the same module fine-tunes a DeiT
on CIFAR (the teachers of the paper's knowledge-transfer experiment are not public).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor

from core.run_dir import run_directory
from core.timm_models import create_model, export_weights


class ClassifierModule(L.LightningModule):
    """Train a timm classifier with cross-entropy, AdamW and a cosine schedule.

    Args:
        model: timm model name.
        model_kwargs: extra ``timm.create_model`` arguments (``img_size``, ``patch_size``, ``in_chans``,
            ``num_classes``, ``embed_dim``, ``depth``, ``num_heads``...).
        checkpoint: optional local weights to start from.
        pretrained: start from timm's pretrained weights (local cache when offline).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warm-up before the cosine decay.
        label_smoothing: cross-entropy label smoothing.
        export_path: where the trained weights are written as safetensors at the end of ``fit``
            (default: ``<run dir>/model.safetensors``).
    """

    def __init__(
        self,
        model: str = "vit_tiny_patch16_224",
        model_kwargs: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        pretrained: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: int = 1,
        label_smoothing: float = 0.0,
        export_path: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.model = create_model(model, pretrained, checkpoint, model_kwargs, key="model.init_args.model",
                                  checkpoint_key="model.init_args.checkpoint")
        num_classes = self.model.num_classes
        self.acc = torch.nn.ModuleDict({
            f"{split}_acc": torchmetrics.Accuracy(task="multiclass", num_classes=num_classes) for split in ("train", "val", "test")
        })

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def _step(self, batch: dict[str, Tensor], split: str) -> Tensor:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)
        self.acc[f"{split}_acc"](logits, batch["label"])
        self.log_dict({f"{split}/loss": loss, f"{split}/acc": self.acc[f"{split}_acc"]}, prog_bar=True)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, self.trainer.estimated_stepping_batches)
        warmup = min(total - 1, self.hparams.warmup_epochs * total // max(1, self.trainer.max_epochs or 1))
        schedule = torch.optim.lr_scheduler.SequentialLR(
            opt,
            [
                torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=max(1, warmup)),
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total - warmup)),
            ],
            milestones=[max(1, warmup)],
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_end(self) -> None:
        folder = run_directory(self.trainer)  # a collective call: every rank
        if self.global_rank == 0:
            path = self.hparams.export_path or folder / "model.safetensors"
            export_weights(self.model, path)
