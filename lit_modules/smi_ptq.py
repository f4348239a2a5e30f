"""Data-free post-training quantisation calibrated on inverted images (the SMI paper's task 1).

Hu et al., ICML 2024, Sec. 5 (release: ``test_quant.py``): the quantiser of PSAQ-ViT (Li et al.,
ECCV 2022) -- per-channel min/max weights, per-tensor min/max activations, no reconstruction --
records its activation ranges on N inverted images (paper: 32), each run on the sparse token set it
was synthesised with, and the quantised model is then evaluated densely on real held-out data. The
ranges are those of the float network (quantisation off while recording, as PSAQ and the release);
``core.quantization.calibration`` switches quantisation off and back on.

Stages map to Lightning as: ``fit`` = one calibration epoch over the inverted images (no optimiser;
ranges freeze at the end of the epoch, then validation reports quantised and float accuracy);
``test`` with the fit's checkpoint evaluates on the test split.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import lightning as L
import torch
import torchmetrics
from torch import Tensor

from core import vit_tokens
from core.quantization import calibration, quantize_vit
from core.timm_models import create_model


class SMIQuantizationModule(L.LightningModule):
    """Fake-quantise a ViT, calibrate it on (sparse) inverted images, evaluate on real data.

    Args:
        model: timm model name of the full-precision ViT (the inverted teacher).
        model_kwargs: ``timm.create_model`` arguments.
        checkpoint: local weights of the model.
        pretrained: load timm's pretrained weights instead.
        weight_bits: weight bit width (paper: 4 or 8).
        act_bits: activation bit width (paper: 8).
        weight_granularity: ``channel`` (one weight scale per output channel, PSAQ and the paper) or
            ``tensor`` (one per layer: a harder quantisation, where calibration matters more).
        sparse_tokens: calibrate each image on its kept patches (paper); ``false`` runs the masked
            images densely.
    """

    def __init__(
        self,
        model: str = "deit_tiny_patch16_224",
        model_kwargs: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        pretrained: bool = False,
        weight_bits: int = 4,
        act_bits: int = 8,
        weight_granularity: Literal["channel", "tensor"] = "channel",
        sparse_tokens: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.automatic_optimization = False
        self.model = create_model(model, pretrained, checkpoint, model_kwargs, key="model.init_args.model",
                                  checkpoint_key="model.init_args.checkpoint").eval()
        vit_tokens.require_vit(self.model, "model.init_args.model")
        self.model.requires_grad_(False)
        self.quantized = quantize_vit(self.model, weight_bits=weight_bits, act_bits=act_bits,
                                      weight_granularity=weight_granularity)
        self._calibrating: contextlib.AbstractContextManager | None = None
        classes = self.model.num_classes
        self.acc = torch.nn.ModuleDict({
            f"{split}_{kind}": torchmetrics.Accuracy(task="multiclass", num_classes=classes)
            for split in ("val", "test") for kind in ("quant", "fp")
        })

    def train(self, mode: bool = True) -> SMIQuantizationModule:
        super().train(mode)
        self.model.eval()
        self.quantized.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        return self.quantized(images)

    def configure_optimizers(self) -> None:
        return None  # post-training quantisation learns nothing

    def on_train_epoch_start(self) -> None:
        self._calibrating = calibration(self.quantized)
        self._calibrating.__enter__()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        index = batch.get("keep_index") if self.hparams.sparse_tokens else None
        with torch.no_grad():
            vit_tokens.forward_kept(self.quantized, batch["image"], index)
        self.log("train/calibration_images", float(len(batch["image"])), reduce_fx="sum", on_step=False, on_epoch=True)

    def _freeze_ranges(self) -> None:
        if self._calibrating is not None:
            self._calibrating.__exit__(None, None, None)  # freeze (and all-reduce) the ranges
            self._calibrating = None

    def on_validation_epoch_start(self) -> None:
        # Lightning validates before on_train_epoch_end: real held-out images must never widen ranges.
        self._freeze_ranges()

    def on_train_epoch_end(self) -> None:
        self._freeze_ranges()

    def _evaluate(self, batch: dict[str, Tensor], split: str) -> None:
        metrics = {}
        kinds = ("fp",) if self.trainer.sanity_checking else ("fp", "quant")  # ranges exist after fit
        for kind in kinds:
            net = self.model if kind == "fp" else self.quantized
            metric = self.acc[f"{split}_{kind}"]
            metric(net(batch["image"]), batch["label"])
            metrics[f"{split}/acc" if kind == "quant" else f"{split}/acc_fp"] = metric
        self.log_dict(metrics, prog_bar=True)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")
