"""Fine-tune one encoder per task from a shared pre-trained backbone: the experts that get merged.

Model merging (task arithmetic, TIES, AdaMerging, Surgery) needs K experts fine-tuned from the same
theta_0 with frozen heads (mlfoundations/task_vectors freezes CLIP's zero-shot text heads and trains
the image tower only). With a CLIP image tower, ``head: zero_shot`` builds that frozen head from the
task's class names and CLIP's text tower (``core.zero_shot_head``). Offline there is no CLIP, so this
module also pre-trains theta_0 (``head: learned``: a trainable cosine classifier on the pre-training
task) and, for each expert, builds a zero-shot-like head from theta_0's class-mean features
(``head: prototype``; ``head: orthogonal`` makes the class means orthonormal; ``head: joint`` makes
the class means of all the data module's ``head_tasks`` orthonormal together and keeps this task's
rows), freezes it and fine-tunes the encoder. The encoder and its head are written as safetensors
(``<export_path>`` and ``<name>.head.safetensors``) for ``AdaMergingModule`` and ``SurgeryModule``.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from core.timm_models import create_model, export_weights
from core.zero_shot_head import DEFAULT_TEMPLATES, clip_text_encoder, zero_shot_head
from lit_modules.surgery_parts import class_means, head_path, joint_heads, probe_input, prototype_head


class ExpertModule(L.LightningModule):
    """Train a timm encoder (its output is the representation) with a cosine-classifier head.

    Args:
        model: timm model name; its output (e.g. ``num_classes=48`` as a projection) is the representation.
        model_kwargs: extra ``timm.create_model`` arguments.
        pretrained: start from timm's pretrained weights (local cache when offline).
        checkpoint: local weights to start from (theta_0 for experts).
        num_classes: classes of the task.
        head: ``learned`` trains the head with the encoder (pre-training); ``prototype`` builds it from
            the starting encoder's class means on the training data and freezes it; ``orthogonal``
            (demo experts) makes those class means orthonormal first, so the frozen rows are well
            separated like CLIP's text heads; ``joint`` (demo experts) does that for the class means of
            every task in the data module's ``head_tasks`` at once and keeps this task's rows, so that
            the heads of different tasks are orthogonal too (every expert builds the same set);
            ``zero_shot`` builds it from the task's class names (the data module's ``class_names``)
            and ``text_encoder``, and freezes it (CLIP experts, as task_vectors).
        logit_scale: temperature folded into prototype and zero-shot heads (CLIP's exp(logit_scale) = 100).
        text_encoder: Hugging Face CLIP checkpoint (local directory or cached id) whose text tower
            matches the image tower, for ``head: zero_shot``.
        templates: prompt patterns with one ``{}`` for the class name (``head: zero_shot``); default
            generic photo prompts.
        lr: peak AdamW learning rate (one-cycle: linear warm-up, cosine decay).
        weight_decay: AdamW weight decay (0.1 in task_vectors).
        warmup: fraction of the steps spent warming up.
        export_path: where the encoder is written at the end of ``fit`` (its head next to it).
    """

    def __init__(
        self,
        model: str = "vit_tiny_patch16_224",
        model_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        checkpoint: str | None = None,
        num_classes: int = 10,
        head: Literal["learned", "prototype", "orthogonal", "joint", "zero_shot"] = "orthogonal",
        logit_scale: float = 100.0,
        text_encoder: str | None = None,
        templates: list[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup: float = 0.1,
        export_path: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if head == "zero_shot" and not text_encoder:
            raise ValueError("model.init_args.text_encoder is required with head: zero_shot (a CLIP checkpoint)")
        self.encoder = create_model(model, pretrained, checkpoint, model_kwargs, key="model.init_args.model",
                                    checkpoint_key="model.init_args.checkpoint")
        with torch.no_grad():
            dim = self.encoder(probe_input(self.encoder)).shape[-1]
        self.head = nn.Linear(dim, num_classes, bias=False)
        self.head.requires_grad_(head == "learned")
        self.acc = nn.ModuleDict({f"{s}_acc": torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
                                  for s in ("train", "val")})
        self._head_restored = False  # set when a checkpoint brings the (prototype) head along

    def forward(self, images: Tensor) -> Tensor:
        return F.normalize(self.encoder(images), dim=-1) @ self.head.weight.T

    @torch.no_grad()
    def setup(self, stage: str) -> None:
        if self.hparams.head != "zero_shot":
            return
        datamodule = self.trainer.datamodule
        names = getattr(datamodule, "class_names", None) or {}
        names = {t: names[t] for t in getattr(datamodule, "tasks", names) if t in names}  # not head_tasks' names
        if len(names) != 1:
            raise ValueError(f"head: zero_shot needs a data module with the class names of exactly one task "
                             f"(data.init_args.tasks); got {sorted(names) or 'none'}")
        (task, classes), = names.items()
        if len(classes) != self.hparams.num_classes:
            raise ValueError(f"model.init_args.num_classes is {self.hparams.num_classes} but task {task!r} has "
                             f"{len(classes)} classes")
        encode = clip_text_encoder(self.hparams.text_encoder, self.device)
        head = zero_shot_head(encode, classes, self.hparams.templates or DEFAULT_TEMPLATES, self.hparams.logit_scale)
        if head.shape[1] != self.head.in_features:
            raise ValueError(f"model.init_args.text_encoder embeds into {head.shape[1]} dimensions but the image "
                             f"tower {self.hparams.model!r} into {self.head.in_features}: use the matching CLIP pair")
        self.head.weight.copy_(head)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._head_restored = True  # the checkpoint's head was built from theta_0 when the run started

    @torch.no_grad()
    def on_train_start(self) -> None:
        # On resume the encoder is already part-way fine-tuned: keep the head that came with the checkpoint.
        head, scale = self.hparams.head, self.hparams.logit_scale
        if head not in ("prototype", "orthogonal", "joint") or self._head_restored:
            return
        if head != "joint":
            features, labels = self._features(self.trainer.train_dataloader)
            self.head.weight.copy_(prototype_head(features, labels, self.hparams.num_classes, scale,
                                                  orthogonal=head == "orthogonal"))
            return
        datamodule = self.trainer.datamodule
        loaders = datamodule.head_dataloaders() if hasattr(datamodule, "head_dataloaders") else {}
        own = datamodule.tasks[0] if loaders else None
        if own not in loaders:
            raise ValueError("model.init_args.head: joint needs data.init_args.head_tasks listing this expert's task "
                             f"({own}) and the other merged tasks")
        means = {t: class_means(*self._features(loader), len(datamodule.class_names[t])) for t, loader in loaders.items()}
        rows = dict(zip(means, joint_heads(list(means.values()), scale)))
        if len(rows[own]) != self.hparams.num_classes:
            raise ValueError(f"model.init_args.num_classes is {self.hparams.num_classes} but task {own!r} has "
                             f"{len(rows[own])} classes")
        self.head.weight.copy_(rows[own])

    def _features(self, loader: Any) -> tuple[Tensor, Tensor]:
        """The encoder's features and labels of every batch of ``loader`` (all ranks' shards under DDP)."""
        features, labels = [], []
        for batch in loader:
            features.append(self.encoder(batch["image"].to(self.device)))
            labels.append(batch["label"].to(self.device))
        features, labels = torch.cat(features), torch.cat(labels)
        if self.trainer.world_size > 1:  # every rank builds the same head from all ranks' shards
            features, labels = self.all_gather(features).flatten(0, 1), self.all_gather(labels).flatten(0, 1)
        return features, labels

    def _step(self, batch: dict[str, Tensor], split: str) -> Tensor:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        self.acc[f"{split}_acc"](logits, batch["label"])
        self.log_dict({f"{split}/loss": loss, f"{split}/acc": self.acc[f"{split}_acc"]}, prog_bar=True,
                      add_dataloader_idx=False)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.hparams.lr, total_steps=max(2, int(self.trainer.estimated_stepping_batches)),
            pct_start=self.hparams.warmup, anneal_strategy="cos", cycle_momentum=False)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_end(self) -> None:
        if self.global_rank == 0 and self.hparams.export_path:
            export_weights(self.encoder, self.hparams.export_path)
            export_weights(self.head, head_path(self.hparams.export_path))
