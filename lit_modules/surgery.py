"""Representation Surgery (V1, ICML 2024) and SurgeryV2 (deep surgery) on a merged multi-task model.

Papers: E. Yang et al., "Representation Surgery for Multi-Task Model Merging", ICML 2024
(arXiv 2402.02705, code EnnengYang/RepresentationSurgery) and "SurgeryV2: Bridging the Gap Between
Model Merging and Multi-Task Learning with Deep Representation Surgery" (arXiv 2410.14389, code
EnnengYang/SurgeryV2).

Idea: merging K experts (weight averaging, task arithmetic, TIES, AdaMerging; ``core.merging``)
leaves a *representation bias*: on task t the merged encoder's representation z differs from the
expert's z_t. Surgery keeps the merged model frozen and learns, per task, a tiny low-rank module
that estimates that bias from z and subtracts it, trained without labels by pulling the corrected
representation towards the expert's on unlabelled test images (L1). SurgeryV2 puts such a module
after every transformer block, on the residual stream, and aligns every level (token means of each
block output, plus the final representation). The task id is known at test time.

Equations (numbered here; the PDFs' numbering could not be checked):
- (S1) representation bias  Bias_t = E_x |f(x; theta_m) - f(x; theta_t)|_1      -> ``val/bias_<task>``
- (S2) Surgery             z_hat = z - Phi_t(z),  Phi_t(z) = W_up ReLU(W_down z)  -> ``_correct`` / LowRankCorrection
- (S3) V1 objective        min_Phi sum_t E_x |z_hat_t(x) - z_t(x)|_1              -> ``_loss``
- (S4) V2 block surgery    h_b <- h_b - Phi_{t,b}(h_b) after every block b        -> ``_edit``
- (S5) V2 objective        min sum_t sum_b E_x |mean_tok h_b - mean_tok h_b^t|_1 + (S3)  -> ``_loss``
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core import merging
from core.block_hooks import block_widths, edited_blocks, find_blocks
from core.run_dir import run_directory
from core.timm_models import create_model
from lit_modules.surgery_parts import (
    FeatureCache,
    LowRankCorrection,
    TaskHeads,
    drop_frozen,
    freeze,
    load_task_models,
    log_mean_accuracy,
    probe_input,
    restore_frozen,
    task_accuracies,
    tower_hashes,
)
from lit_modules.surgery_report import write_report


def merged_state(pretrained: dict[str, Tensor], experts: list[dict[str, Tensor]], merge: str, scaling: float,
                 ties_top_k: float, ties_merge: str, ties_per_tensor: bool) -> dict[str, Tensor]:
    """The closed-form merges of ``core.merging`` by name (the Surgery code's hyper-parameters by default)."""
    if merge == "weight_average":
        return merging.weight_average(experts)
    if merge == "task_arithmetic":
        return merging.task_arithmetic(pretrained, experts, scaling)
    if merge == "ties":
        return merging.ties_merging(pretrained, experts, ties_top_k, scaling, ties_merge, ties_per_tensor)
    raise ValueError(f"model.init_args.merge: unknown merge {merge!r}")


class SurgeryModule(L.LightningModule):
    """Train per-task surgery modules on a frozen merged encoder (V1: final representation; V2: every block).

    Args:
        model: timm model name of the encoder (e.g. ``vit_base_patch32_clip_224.openai``; its output is
            the representation z, e.g. CLIP's projected image embedding).
        model_kwargs: extra ``timm.create_model`` arguments.
        pretrained: build the pre-trained encoder with timm's weights (local cache when offline).
        pretrained_checkpoint: local weights of the pre-trained encoder theta_0.
        experts: ``{task: weights file}`` of the fine-tuned encoders; the order defines the tasks.
        heads: ``{task: head file}`` (safetensors with ``weight`` (classes, dim)); by default
            ``<expert>.head.safetensors`` next to each expert.
        merge: ``weight_average``, ``task_arithmetic``, ``ties`` (computed here) or ``checkpoint``
            (a merged encoder written by AdaMerging, in ``merged_checkpoint``).
        merged_checkpoint: merged encoder weights for ``merge: checkpoint``.
        scaling: lambda of task arithmetic and TIES (0.3 as in the Surgery code).
        ties_top_k: fraction of each task vector TIES keeps.
        ties_merge: TIES disjoint merge, ``sum`` (Surgery/AdaMerging) or ``mean`` (TIES paper).
        ties_per_tensor: TIES top-k per tensor (mergekit) instead of over the whole model (the released code).
        version: ``v1`` (Surgery on the final representation) or ``v2`` (after every block too).
        rank: hidden width of every surgery module (16 in both papers for ViT-B).
        correct: ``projected`` corrects the unnormalised representation and the head normalises
            after (the original code); ``normalized`` corrects the L2-normalised one (FusionBench).
        lr: Adam learning rate (1e-3 in the papers).
        cache_features: cache the frozen models' outputs per image (expert targets, and the merged
            representation for V1): exact because nothing is augmented; turn off for augmented data.
        report: at the end of ``fit`` write, under the run directory's ``export/``, the merged encoder and
            the trained surgery modules (safetensors), a model card, and two figures (per-layer
            representation bias and per-task accuracy of plain merge, corrected merge and experts).
    """

    def __init__(
        self,
        model: str = "vit_tiny_patch16_224",
        model_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        pretrained_checkpoint: str | None = None,
        experts: dict[str, str] | None = None,
        heads: dict[str, str] | None = None,
        merge: Literal["weight_average", "task_arithmetic", "ties", "checkpoint"] = "task_arithmetic",
        merged_checkpoint: str | None = None,
        scaling: float = 0.3,
        ties_top_k: float = 0.2,
        ties_merge: Literal["sum", "mean"] = "sum",
        ties_per_tensor: bool = False,
        version: Literal["v1", "v2"] = "v1",
        rank: int = 16,
        correct: Literal["projected", "normalized"] = "projected",
        lr: float = 1e-3,
        cache_features: bool = True,
        report: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        encoder, base, states, head_weights = load_task_models(model, model_kwargs, pretrained, pretrained_checkpoint,
                                                               experts, heads)
        self.tasks = list(states)
        if merge == "checkpoint":
            if not merged_checkpoint:
                raise ValueError("model.init_args.merged_checkpoint is required with merge: checkpoint")
            self.merged = create_model(model, False, merged_checkpoint, model_kwargs, key="model.init_args.merged")
        else:
            encoder.load_state_dict(merged_state(base, list(states.values()), merge, scaling, ties_top_k, ties_merge,
                                                 ties_per_tensor))
            self.merged = encoder
        freeze(self.merged)
        self.experts = nn.ModuleList()
        for state in states.values():
            expert = create_model(model, False, None, model_kwargs, key="model.init_args.model")
            expert.load_state_dict(state)
            self.experts.append(freeze(expert))
        self.heads = TaskHeads(head_weights)
        widths, proj = self._widths()
        self.surgery = nn.ModuleDict({  # per task: [block 1..L (V2 only), final representation]
            task: nn.ModuleList([LowRankCorrection(w, rank) for w in widths] + [LowRankCorrection(proj, rank)])
            for task in self.tasks
        })
        self.acc = task_accuracies(head_weights)
        self._cache: dict[tuple[str, str], FeatureCache] = {}
        towers = {"model.init_args.pretrained_checkpoint": base,
                  **{f"model.init_args.experts.{t}": state for t, state in states.items()}}
        if merge == "checkpoint":
            towers["model.init_args.merged_checkpoint"] = self.merged.state_dict()
        self._hashes = tower_hashes(towers)

    @property
    def _deep(self) -> bool:
        return self.hparams.version == "v2"

    @torch.no_grad()
    def _widths(self) -> tuple[list[int], int]:
        """Widths of every block's output (V2 only; V1 needs no blocks) and of the representation."""
        example = probe_input(self.merged)
        if self._deep:
            return block_widths(self.merged, find_blocks(self.merged), example)
        return [], self.merged(example).shape[-1]

    # ------------------------------------------------------------------ forward
    def _final(self, z: Tensor) -> Tensor:
        return F.normalize(z, dim=-1) if self.hparams.correct == "normalized" else z

    def _levels(self, encoder: nn.Module, images: Tensor, task: str | None, blocks: bool | None = None) -> list[Tensor]:
        """Token means after every block and the final representation, corrected for ``task`` if given.

        ``blocks`` (default: V2 only) records the block levels; V1 never edits them, so its block
        levels are the plain merge's.
        """
        levels: list[Tensor] = []
        if not (self._deep if blocks is None else blocks):
            return [self._correct(task, self._final(encoder(images)))]

        def edit(index: int, hidden: Tensor) -> Tensor:
            if task is not None and self._deep:
                hidden = hidden - self.surgery[task][index](hidden)  # Eq. (S4), on every token
            levels.append(hidden.mean(1))
            return hidden

        with edited_blocks(find_blocks(encoder), edit):
            z = self._final(encoder(images))
        return levels + [self._correct(task, z)]

    def _correct(self, task: str | None, z: Tensor) -> Tensor:
        return z if task is None else z - self.surgery[task][-1](z)  # Eq. (S2)

    def forward(self, images: Tensor, task: str) -> Tensor:
        """Logits of ``task``'s head on the corrected representation of the merged model."""
        self._check_task(task)
        return self.heads(self._levels(self.merged, images, task)[-1], task)

    def _frozen(self, kind: str, task: str, batch: dict[str, Tensor], compute) -> list[Tensor]:
        """Outputs of a frozen model for a batch, cached per image index when ``cache_features``."""
        if not self.hparams.cache_features:
            return compute(batch["image"])
        return self._cache.setdefault((kind, task), FeatureCache())(batch["index"], batch["image"], compute)

    @torch.no_grad()
    def _targets(self, task: str, batch: dict[str, Tensor]) -> list[Tensor]:
        expert = self.experts[self.tasks.index(task)]
        return self._frozen("expert", task, batch, lambda x: self._levels(expert, x, None))

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"task {task!r} has no expert/head: add it to model.init_args.experts (known: {self.tasks})")

    def _loss(self, task: str, batch: dict[str, Tensor]) -> Tensor:
        self._check_task(task)
        targets = self._targets(task, batch)
        if not self._deep:  # V1: the merged representation never changes, so it can be cached
            with torch.no_grad():
                z = self._frozen("merged", task, batch, lambda x: [self._final(self.merged(x))])[0]
            outs = [self._correct(task, z)]
        else:
            outs = self._levels(self.merged, batch["image"], task)
        return sum(F.l1_loss(o, t) for o, t in zip(outs, targets, strict=True))  # Eq. (S3)/(S5)

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        # The released code steps once per task in task order; the tasks share no parameters and Adam
        # is per-parameter, so one step on the summed loss is the same update (torch >= 2, where
        # zero_grad frees gradients) and needs a single backward, without DDP's unused-parameter search.
        losses = {task: self._loss(task, part) for task, part in batch.items()}
        total = sum(losses.values())
        self.log_dict({f"train/loss_{t}": v.detach() for t, v in losses.items()})
        self.log("train/loss", total.detach(), prog_bar=True)
        return total

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        task = batch["task"][0]
        self._check_task(task)
        expert = self.experts[self.tasks.index(task)]
        target = self._frozen("expert_eval", task, batch, lambda x: [self._final(expert(x))])[0]  # output level only
        if self._deep:
            z = self._levels(self.merged, batch["image"], task)[-1]
        else:  # V1 corrects the output only: the merged representation is cached like the target
            with torch.no_grad():
                z = self._correct(task, self._frozen("merged_eval", task, batch, lambda x: [self._final(self.merged(x))])[0])
        self.acc[f"val_acc_{task}"](self.heads(z, task), batch["label"])
        n = len(batch["label"])
        self.log(f"val/acc_{task}", self.acc[f"val_acc_{task}"], add_dataloader_idx=False, batch_size=n)
        self.log(f"val/bias_{task}", (z - target).abs().mean(), add_dataloader_idx=False, batch_size=n,
                 sync_dist=True)  # Eq. (S1), averaged over every rank's images

    def on_validation_epoch_end(self) -> None:
        log_mean_accuracy(self, self.acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.surgery.parameters(), lr=self.hparams.lr, betas=(0.9, 0.999), weight_decay=0.0)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        drop_frozen(self, checkpoint, self._hashes)  # only the trained surgery modules, and the towers' hashes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_frozen(self, checkpoint, self._hashes)

    # ------------------------------------------------------------------ diagnostics and export
    @torch.no_grad()
    def representation_report(self, loaders: list[Any]) -> dict[str, dict[str, Any]]:
        """Per task: accuracy and per-level bias (Eq. (S1) at every block's token mean and at the output)
        of the plain merge, the corrected merge and the expert, on labelled ``{"image", "label", "task"}`` batches."""
        out = {}
        for loader in loaders:
            sums: dict[str, Any] = {}
            count = 0
            for batch in loader:
                task, x, y = batch["task"][0], batch["image"].to(self.device), batch["label"].to(self.device)
                self._check_task(task)
                expert = self._levels(self.experts[self.tasks.index(task)], x, None, blocks=True)
                for name, levels in (("plain", self._levels(self.merged, x, None, blocks=True)),
                                     ("corrected", self._levels(self.merged, x, task, blocks=True)), ("expert", expert)):
                    bias = torch.stack([(a - b).abs().mean(-1).sum() for a, b in zip(levels, expert, strict=True)])
                    hits = (self.heads(levels[-1], task).argmax(-1) == y).sum()
                    prev = sums.get(name, (0, 0))
                    sums[name] = (prev[0] + bias, prev[1] + hits)
                count += len(y)
            out[task] = {name: {"acc": float(hits) / count, "bias": (bias / count).tolist()}
                         for name, (bias, hits) in sums.items()}
        return out

    def on_fit_end(self) -> None:
        root = run_directory(self.trainer)  # a collective call: every rank (the W&B run's own folder too)
        if not self.hparams.report or self.global_rank != 0 or self.trainer.datamodule is None:
            return
        report = self.representation_report(self.trainer.datamodule.val_dataloader())
        write_report(self, report, root, getattr(self, "logger", None))
