"""AdaMerging (Yang et al., ICLR 2024, arXiv 2310.02575; code EnnengYang/AdaMerging): merging coefficients
learned by entropy minimisation on unlabelled test images; the merged encoder it exports is one of the
merges Surgery / SurgeryV2 (``lit_modules.surgery``) correct.

Equations (numbered here):
- (A1) merged weights  theta = theta_0 + sum_k lambda_k tau_k   (per tensor l for layer-wise)   -> ``merged_params``
- (A2) objective       min_lambda sum_t E_x H(softmax(H_t(f(x; theta))))                          -> ``training_step``

Distributed: the K task vectors are plain tensors kept next to the module (moved with it by
``_apply``), not buffers, so DDP never broadcasts them (with ``broadcast_buffers`` it would send all
K of them, K times the encoder's size, from rank 0 on every forward); every rank builds them from the
same files, and a checkpoint records their hash.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from core import merging
from core.timm_models import create_model, export_weights
from lit_modules.surgery_parts import (
    TaskHeads,
    drop_frozen,
    entropy,
    freeze,
    load_task_models,
    log_mean_accuracy,
    restore_frozen,
    task_accuracies,
    tower_hashes,
)


class AdaMergingModule(L.LightningModule):
    """AdaMerging (Yang et al., ICLR 2024): learn merging coefficients by entropy minimisation on unlabelled data.

    ``theta = theta_0 + sum_k lambda_k tau_k`` with one coefficient per task (task-wise) or per task and
    parameter tensor (layer-wise); lambda starts at 0.3, is clamped to [0, 1] where used, and Adam
    (lr 1e-3) minimises the summed mean entropy of every task head's predictions on that task's
    unlabelled images. ``vectors: ties`` is AdaMerging++ (coefficients of the TIES-selected vectors).
    At the end of ``fit`` the merged encoder is written to ``export_path`` for ``SurgeryModule``.

    Args:
        model: timm model name of the encoder.
        model_kwargs: extra ``timm.create_model`` arguments.
        pretrained: build the pre-trained encoder with timm's weights (local cache when offline).
        pretrained_checkpoint: local weights of the pre-trained encoder.
        experts: ``{task: weights file}`` of the fine-tuned encoders.
        heads: ``{task: head file}``; by default ``<expert>.head.safetensors``.
        granularity: ``task`` (K coefficients) or ``layer`` (K x number of float tensors).
        vectors: ``task`` (plain task vectors) or ``ties`` (AdaMerging++: TIES-selected vectors).
        ties_top_k: TIES keep fraction for ``vectors: ties``.
        init: initial coefficient (0.3).
        clamp: clamp coefficients to [0, 1] where used (the original; FusionBench does not).
        lr: Adam learning rate (1e-3).
        export_path: where the merged encoder is written (safetensors) at the end of ``fit``; the
            coefficients go next to it as ``<name>.coefficients.safetensors``.
    """

    def __init__(
        self,
        model: str = "vit_tiny_patch16_224",
        model_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        pretrained_checkpoint: str | None = None,
        experts: dict[str, str] | None = None,
        heads: dict[str, str] | None = None,
        granularity: Literal["task", "layer"] = "layer",
        vectors: Literal["task", "ties"] = "task",
        ties_top_k: float = 0.2,
        init: float = 0.3,
        clamp: bool = True,
        lr: float = 1e-3,
        export_path: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        encoder, base, states, head_weights = load_task_models(model, model_kwargs, pretrained, pretrained_checkpoint,
                                                               experts, heads)
        self.tasks, self.encoder, self.heads = list(states), freeze(encoder), TaskHeads(head_weights)
        finetuned = list(states.values())
        taus = (merging.ties_selected(base, finetuned, ties_top_k) if vectors == "ties"
                else [merging.task_vector(s, base) for s in finetuned])
        self.layers = merging.layer_keys(base)
        # (K, *shape) per tensor; not buffers (see the module docstring), so neither broadcast nor checkpointed
        self.taus = [torch.stack([t[k] for t in taus]) for k in self.layers]
        self._hashes = tower_hashes({"model.init_args.pretrained_checkpoint": base,
                                     **{f"model.init_args.experts.{t}": s for t, s in states.items()}})
        shape = (len(self.tasks),) if granularity == "task" else (len(self.tasks), len(self.layers))
        self.coefficients = nn.Parameter(torch.full(shape, float(init)))
        self.acc = task_accuracies(head_weights)

    def _apply(self, fn, recurse: bool = True):  # .to(device) / .double() move the task vectors too
        super()._apply(fn, recurse)
        self.taus = [fn(t) for t in self.taus]
        return self

    def lambdas(self) -> Tensor:
        """The coefficients as used: clamped to [0, 1] unless ``clamp`` is off."""
        return self.coefficients.clamp(0.0, 1.0) if self.hparams.clamp else self.coefficients

    def merged_params(self) -> dict[str, Tensor]:
        base = self.encoder.state_dict()  # the frozen encoder is theta_0: no second copy of it
        vectors = [{k: self.taus[i][j] for i, k in enumerate(self.layers)} for j in range(len(self.tasks))]
        return merging.combine(base, vectors, self.lambdas())  # Eq. (A1)

    def _represent(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(self.encoder, params, (images,))

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        params = self.merged_params()
        unknown = sorted(set(batch) - set(self.tasks))
        if unknown:
            raise ValueError(f"batches of tasks {unknown} have no expert/head; model.init_args.experts has {self.tasks}")
        z = self._represent(torch.cat([b["image"] for b in batch.values()]), params).split(
            [len(b["image"]) for b in batch.values()])
        losses = {t: entropy(self.heads(zt, t)) for t, zt in zip(batch, z)}  # Eq. (A2), per task head
        loss = sum(losses.values())
        self.log_dict({f"train/entropy_{t}": v.detach() for t, v in losses.items()})
        self.log("train/loss", loss.detach(), prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        with torch.no_grad():
            self._eval_params = {k: v.detach() for k, v in self.merged_params().items()}

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        task = batch["task"][0]
        logits = self.heads(self._represent(batch["image"], self._eval_params), task)
        self.acc[f"val_acc_{task}"](logits, batch["label"])
        self.log(f"val/acc_{task}", self.acc[f"val_acc_{task}"], add_dataloader_idx=False, batch_size=len(logits))

    def on_validation_epoch_end(self) -> None:
        log_mean_accuracy(self, self.acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.coefficients], lr=self.hparams.lr, betas=(0.9, 0.999), weight_decay=0.0)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        drop_frozen(self, checkpoint, self._hashes)  # only the trained coefficients; the frozen models come from the config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_frozen(self, checkpoint, self._hashes)

    def merged_encoder(self) -> nn.Module:
        """A copy of the encoder holding the merged weights (clamped coefficients)."""
        encoder = create_model(self.hparams.model, False, None, self.hparams.model_kwargs)
        with torch.no_grad():
            encoder.load_state_dict({k: v.detach().cpu() for k, v in self.merged_params().items()})
        return encoder

    def on_fit_end(self) -> None:
        if self.global_rank == 0 and self.hparams.export_path:
            path = export_weights(self.merged_encoder(), self.hparams.export_path)
            coeffs = nn.Module()
            coeffs.register_buffer("lambdas", self.lambdas().detach().cpu())
            export_weights(coeffs, path.with_name(path.name.removesuffix(".safetensors") + ".coefficients.safetensors"))
