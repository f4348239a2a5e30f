"""Data-free knowledge transfer from inverted images (the SMI paper's downstream task 2).

Hu et al., ICML 2024, Sec. 5 (code: ``test_kt.py`` of the release): a student learns from the
teacher's soft labels on images inverted from that teacher, and is evaluated on real held-out data.
Both networks run on the sparse token set each inverted image was synthesised with, so sparse images
cost less to distil from as well.

    L_KD = T^2 KL(softmax(f_t(x) / T) || softmax(f_s(x) / T)),  T = 20     -> ``core.kd.kd_kl_div``

The paper's student is an ImageNet-pretrained DeiT whose backbone is frozen (linear probe,
``linear_probe: true``) with SGD 0.1 / momentum 0.9 / wd 1e-4. Offline, the demo's student is the
teacher's architecture pre-trained on printed glyphs (configs/smi/demo_student.yaml): good frozen
features that are not the teacher's.

Speed: for a fixed pool (no augmentation) the frozen teacher's logits and, for a linear probe, the
frozen student's features depend on the image only, so they are computed once per image when training
starts (``cache_frozen_outputs``) and each step trains the head on the cached features.
Release augmentation: ``test_kt.py`` flips pool images horizontally (p = 0.5) during distillation;
``flip: true`` does the same (kept patch positions mirrored with the image). With the cache, both
orientations of every image are cached and each step draws one per row. Off by default: the paper does
not mention it, and digits are not mirror-symmetric.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor

from core import vit_tokens
from core.kd import kd_kl_div
from core.timm_models import create_model


class SMIDistillationModule(L.LightningModule):
    """Distil a frozen teacher into a student on inverted images; evaluate on real data.

    Args:
        teacher: timm model name of the teacher that was inverted.
        teacher_kwargs: ``timm.create_model`` arguments of the teacher.
        teacher_checkpoint: local weights of the teacher.
        pretrained_teacher: load timm's pretrained teacher weights instead.
        student: timm model name of the student.
        student_kwargs: ``timm.create_model`` arguments of the student (``num_classes`` must match).
        student_checkpoint: local weights to start the student from.
        pretrained_student: start the student from timm's pretrained weights (paper: ImageNet DeiT).
        linear_probe: train only the student's classifier head on a freshly reset head (paper).
        temperature: distillation temperature T (paper: 20).
        lr: SGD learning rate (paper: 0.1, constant).
        momentum: SGD momentum (paper: 0.9).
        weight_decay: SGD weight decay (paper: 1e-4).
        sparse_tokens: run teacher and student on each image's kept patches (paper); ``false`` feeds
            the masked images densely. A CNN student always reads the masked image densely.
        cache_frozen_outputs: compute the teacher's logits (and a linear probe's features) once per
            pool image at the start of training; needs batches with an ``index`` (SMIDataModule pools).
        flip: random horizontal flip of each training image with p = 0.5 (the release's ``test_kt.py``).
    """

    def __init__(
        self,
        teacher: str = "deit_tiny_patch16_224",
        teacher_kwargs: dict[str, Any] | None = None,
        teacher_checkpoint: str | None = None,
        pretrained_teacher: bool = False,
        student: str = "deit_tiny_patch16_224",
        student_kwargs: dict[str, Any] | None = None,
        student_checkpoint: str | None = None,
        pretrained_student: bool = False,
        linear_probe: bool = True,
        temperature: float = 20.0,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        sparse_tokens: bool = True,
        cache_frozen_outputs: bool = True,
        flip: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.teacher = create_model(
            teacher, pretrained_teacher, teacher_checkpoint, teacher_kwargs, key="model.init_args.teacher"
        ).eval()
        self.teacher.requires_grad_(False)
        self.student = create_model(
            student, pretrained_student, student_checkpoint, student_kwargs, key="model.init_args.student"
        )
        if linear_probe:  # a pre-trained student may come with another head (e.g. 122 glyph classes)
            self.student.requires_grad_(False)
            self.student.reset_classifier(self.teacher.num_classes)  # fresh head, trainable
        if self.student.num_classes != self.teacher.num_classes:
            raise ValueError(
                f"model.init_args.student_kwargs.num_classes ({self.student.num_classes}) must equal the "
                f"teacher's ({self.teacher.num_classes})"
            )
        if sparse_tokens:
            vit_tokens.require_vit(self.teacher, "model.init_args.teacher (sparse_tokens: true)")
        self._cache: dict[str, Tensor] | None = None
        self.acc = torch.nn.ModuleDict({
            f"{split}_acc": torchmetrics.Accuracy(task="multiclass", num_classes=self.teacher.num_classes)
            for split in ("val", "test")
        })

    def train(self, mode: bool = True) -> SMIDistillationModule:
        super().train(mode)
        self.teacher.eval()
        if self.hparams.linear_probe:
            self.student.eval()  # frozen backbone: no dropout / stochastic depth
        return self

    def forward(self, images: Tensor) -> Tensor:
        return self.student(images)

    def _tokens(self, batch: dict[str, Tensor]) -> Tensor | None:
        return batch.get("keep_index") if self.hparams.sparse_tokens else None

    def _flip_draw(self, rows: int) -> Tensor:
        """Which rows to flip: seeded by the step and rank, so resumption and the cache draw the same bits."""
        gen = torch.Generator(device=self.device).manual_seed(self.global_step * 1009 + self.global_rank)
        return torch.rand(rows, generator=gen, device=self.device) < 0.5

    def _flipped(self, batch: dict[str, Tensor], flip: Tensor) -> dict[str, Tensor]:
        """``batch`` with the rows where ``flip`` (B,) is True mirrored, their kept patches with them."""
        out = dict(batch, image=torch.where(flip.view(-1, 1, 1, 1), batch["image"].flip(-1), batch["image"]))
        if "keep_index" in batch:
            grid, patch = vit_tokens.grid_size(self.teacher), self.teacher.patch_embed.patch_size[0]
            mirrored = vit_tokens.remap_rolled_flipped(batch["keep_index"], grid, patch, (0, 0), True)
            out["keep_index"] = torch.where(flip.view(-1, 1), mirrored, batch["keep_index"])
        return out

    def _run(self, model: torch.nn.Module, batch: dict[str, Tensor], pre_logits: bool = False) -> Tensor:
        if not isinstance(model, vit_tokens.VisionTransformer):
            return model.forward_head(model.forward_features(batch["image"]), pre_logits=pre_logits)
        return vit_tokens.forward_kept(model, batch["image"], self._tokens(batch), pre_logits=pre_logits)[0]

    @torch.no_grad()
    def on_train_start(self) -> None:
        """Cache the frozen outputs of every pool image (one pass over the training loader)."""
        self._cache = None
        loader = self.trainer.train_dataloader
        if not self.hparams.cache_frozen_outputs or not hasattr(loader, "dataset"):
            return
        cache: dict[str, Tensor] = {}  # name -> (pool size, orientations, dim)
        orientations = 2 if self.hparams.flip else 1
        for batch in loader:
            if "index" not in batch:
                return  # not a pool: compute per step
            batch = {k: v.to(self.device) for k, v in batch.items()}
            for o in range(orientations):
                view = self._flipped(batch, torch.full_like(batch["index"], o, dtype=torch.bool))
                outputs = {"teacher": self._run(self.teacher, view)}
                if self.hparams.linear_probe:
                    outputs["features"] = self._run(self.student, view, pre_logits=True)
                for name, value in outputs.items():
                    if name not in cache:
                        cache[name] = value.new_zeros(len(loader.dataset), orientations, value.shape[1])
                    cache[name][batch["index"], o] = value
        self._cache = cache

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        flip = self._flip_draw(len(batch["image"])) if self.hparams.flip else None
        pick = (batch.get("index"), flip.long() if flip is not None else 0)  # cache rows and orientations
        batch = self._flipped(batch, flip) if flip is not None else batch
        if self._cache is not None:
            teacher_logits = self._cache["teacher"][pick]
        else:
            with torch.no_grad():
                teacher_logits = self._run(self.teacher, batch)
        if self._cache is not None and "features" in self._cache:
            student_logits = self.student.get_classifier()(self._cache["features"][pick])
        else:
            student_logits = self._run(self.student, batch)
        loss = kd_kl_div(student_logits, teacher_logits, self.hparams.temperature)  # L_KD
        agree = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()
        self.log_dict({"train/loss_kd": loss, "train/teacher_agreement": agree}, prog_bar=True)
        return loss

    def _evaluate(self, batch: dict[str, Tensor], split: str) -> None:
        logits = self.student(batch["image"])
        self.acc[f"{split}_acc"](logits, batch["label"])
        self.log_dict(
            {f"{split}/loss": F.cross_entropy(logits, batch["label"]), f"{split}/acc": self.acc[f"{split}_acc"]}, prog_bar=True
        )

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.student.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=self.hparams.lr, momentum=self.hparams.momentum,
                               weight_decay=self.hparams.weight_decay)
