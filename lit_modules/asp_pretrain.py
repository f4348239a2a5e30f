"""Supervised pre-training of ASP's small ViT backbone (the offline stand-in for ImageNet pre-training).

A timm ViT with a linear head learns to classify the pre-training classes (``datamodules.asp_pretrain``,
disjoint from the FSCIL classes); at the end of fit the backbone (without the head) is written as
safetensors to ``export_path``, which the ASP configs load as ``model.init_args.backbone_checkpoint``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from core.prompted_vit import require_prompt_vit
from core.rng import keyed_generator
from core.tensor_augment import random_crop_flip
from core.timm_models import create_model, export_weights


class ViTPretrainModule(L.LightningModule):
    """Train a timm ViT + linear head with cross-entropy; export the ViT.

    Args:
        backbone: timm ViT name.
        backbone_kwargs: ``timm.create_model`` arguments (``img_size``, ``patch_size``, ``embed_dim``...).
        num_classes: pre-training classes (must match the data module's).
        lr: AdamW peak learning rate (one-cycle cosine schedule).
        weight_decay: AdamW weight decay.
        warmup: fraction of the steps spent warming up.
        augment_padding: random shift by up to this many pixels in training (0: none).
        export_path: where the backbone's safetensors go at the end of fit (None: not exported).
    """

    def __init__(self, backbone: str = "vit_tiny_patch16_224", backbone_kwargs: dict[str, Any] | None = None,
                 num_classes: int = 10, lr: float = 0.002, weight_decay: float = 0.05, warmup: float = 0.1,
                 augment_padding: int = 2, export_path: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        vit = create_model(backbone, False, None, {**(backbone_kwargs or {}), "num_classes": 0},
                           key="model.init_args.backbone")
        self.vit = require_prompt_vit(vit, "model.init_args.backbone")
        self.head = nn.Linear(self.vit.embed_dim, num_classes)
        self.acc = nn.ModuleDict({f"{s}_acc": torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
                                  for s in ("train", "val")})

    def setup(self, stage: str) -> None:
        classes = getattr(self.trainer.datamodule, "num_classes", self.hparams.num_classes)
        if classes != self.hparams.num_classes:
            raise ValueError(f"model.init_args.num_classes={self.hparams.num_classes} but the data has {classes} "
                             f"classes; set it to {classes}")

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.vit(images))

    def _step(self, batch: dict[str, Tensor], split: str) -> Tensor:
        images = batch["image"]
        if split == "train" and self.hparams.augment_padding:
            images = random_crop_flip(images, self.hparams.augment_padding, False, keyed_generator(self.global_step, 31))
        logits = self(images)
        loss = F.cross_entropy(logits, batch["label"])
        self.acc[f"{split}_acc"](logits, batch["label"])
        self.log_dict({f"{split}/loss": loss, f"{split}/acc": self.acc[f"{split}_acc"]}, prog_bar=True)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.hparams.lr, total_steps=max(2, int(self.trainer.estimated_stepping_batches)),
            pct_start=self.hparams.warmup, anneal_strategy="cos", cycle_momentum=False)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_end(self) -> None:
        if self.global_rank == 0 and self.hparams.export_path:
            export_weights(self.vit, self.hparams.export_path)
