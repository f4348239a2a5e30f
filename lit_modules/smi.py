"""Sparse Model Inversion (SMI): invert a frozen ViT teacher into images, dropping background tokens.

Hu, Wei, Shen, Wang, Li, Yuan, Tao. "Sparse Model Inversion: Efficient Inversion of Vision Transformers
for Data-Free Applications", ICML 2024 (arXiv:2510.27186).

Idea. DeepInversion-style inversion optimises a batch of images so that a frozen classifier assigns
them chosen labels, with image priors keeping them natural. For a ViT most of that compute is spent on
background patches that the classifier barely attends to. SMI periodically ranks the patch tokens by
the last block's CLS attention and stops computing on the lowest ones, so that later iterations run
the transformer on ~a quarter of the tokens ("hallucinated" background stops being optimised too).
The schedule lives in ``callbacks.token_dropping.SparseTokenDropping``; without that callback this
module is the dense DeepInversion baseline ("DMI").

Equations -> code:
    L = CE(f(aug(x)), y) + a_tv2 TV_l2 + a_tv1 TV_l1 + a_l2 ||x|| + a_bn R_BN + a_pse L_PSE  -> ``training_step``
    token scores s_j = mean_h A^L_{h,CLS,j}                      -> ``core.vit_tokens.cls_attention``
    K_i = int(K_{i-1} * keep_ratio)                              -> ``SparseTokenDropping``
    jitter/flip remapping of kept patch positions                -> ``core.vit_tokens.remap_rolled_flipped``

Run: ``python train.py fit --config configs/smi/demo.yaml``.

Distributed: the image batch is one parameter replicated on every rank; rank r optimises rows
``[r*b, (r+1)*b)`` (each rank inverts its own images with its own jitter). The cross-entropy is the mean
over the rank's rows, so after DDP's gradient average each row gets 1/B of its CE gradient, as in one
process; the image priors (TV, l2) are computed on the whole replicated batch, so their weight against
the CE does not change with the world size either. Every rank applies the same Adam update to the whole
tensor, kept-patch indices are all-gathered and the loss that decides the best iterate is all-reduced,
so every buffer (best images included) is identical everywhere and a checkpoint from rank 0 is complete.

Release final mask: ``final_mask: reselect`` ranks the normalised final images and keeps the tracked
count; ``final_mask: release`` ranks the de-normalised images and keeps int(197 * prod(keep ratios)) = 47
patches (one more than it tracked), as the release does (docs/methods/smi.md).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from core import vit_tokens
from core.bn_stats import BatchNormStatsPrior
from core.image_priors import clamp_to_pixel_range, random_roll_flip, total_variation_l1, total_variation_l2
from core.inverted_images import prepare_pool_dir, save_inverted_batch, write_manifest
from core.patch_similarity import PatchSimilarityPrior
from core.resumable_range import ResumableRange
from core.run_dir import run_directory
from core.timm_models import create_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SMIModule(L.LightningModule):
    """Model inversion of a frozen timm teacher; sparse when ``SparseTokenDropping`` is attached.

    Args:
        teacher: timm model name of the frozen teacher (a ViT/DeiT for the sparse path; a CNN such as
            ``resnet50`` works for the dense baseline, optionally with the BN prior).
        teacher_kwargs: extra ``timm.create_model`` arguments (``img_size``, ``patch_size``,
            ``num_classes``, ``in_chans``, ``embed_dim``, ``depth``, ``num_heads``...).
        teacher_checkpoint: local weights for the teacher (safetensors, ``.pth`` or Lightning ``.ckpt``).
        pretrained: load timm's pretrained weights (must be in the local cache when offline).
        batch_size: images inverted together (the global batch; split across DDP ranks).
        num_batches: how many batches to invert one after another.
        iterations: optimisation steps per batch (paper: 4000).
        lr: Adam learning rate on the pixels (paper: 0.25, constant).
        betas: Adam betas (paper: (0.5, 0.99)).
        ce_weight: weight of the cross-entropy to the target labels.
        tv_l2_weight: weight of the l2 total variation (paper scripts: 1e-4).
        tv_l1_weight: weight of the l1 total variation (paper: 0).
        l2_weight: weight of the image l2 norm (paper: 0).
        bn_weight: weight of DeepInversion's BatchNorm-statistics prior (CNN teachers only; paper: 0).
        first_bn_multiplier: extra weight of the first BatchNorm layer in that prior.
        patch_entropy_weight: weight of PSAQ-ViT's patch-similarity entropy prior (``core.patch_similarity``;
            ViT teachers only, on the kept tokens; PSAQ: 1, SMI: 0); dense, the PSAQ baseline's loss.
        jitter: maximal random roll in pixels (default: image size // 8, i.e. 28 px at 224).
        flip: random horizontal flips.
        mean: per-channel normalisation mean of the teacher's inputs.
        std: per-channel normalisation std of the teacher's inputs.
        labels: target labels per batch: ``random`` (uniform, sorted, as the release) or ``balanced``.
        return_images: ``best`` returns the iterate whose loss was lowest (the image the loss was
            computed on, before that step's update); ``last`` reproduces the release, whose best-image
            tracking aliases the live tensor and so returns the last iterate.
        final_mask: ``tracked`` keeps the patches the inversion actually computed on; ``reselect``
            re-ranks them by a dense forward on the final images (same count); ``release`` does what
            the release does: that forward on the de-normalised images, keeping int((N + 1) * prod of
            the keep ratios) patches (47 of 196 for the default schedule, one more than tracked).
        output_dir: the pool folder: ``batch_XXXX.pt`` / ``.png``, ``manifest.json`` (what later stages
            read) and a ``README.md`` card (default: ``<run dir>/inverted``).
        overwrite: replace a pool already in ``output_dir``; otherwise a fresh run refuses to start
            there (a resumed run continues its own pool).
        seed: seed of initial images, labels and augmentation (combined with batch, step and rank).
    """

    def __init__(
        self,
        teacher: str = "deit_tiny_patch16_224",
        teacher_kwargs: dict[str, Any] | None = None,
        teacher_checkpoint: str | None = None,
        pretrained: bool = False,
        batch_size: int = 32,
        num_batches: int = 1,
        iterations: int = 4000,
        lr: float = 0.25,
        betas: tuple[float, float] = (0.5, 0.99),
        ce_weight: float = 1.0,
        tv_l2_weight: float = 1e-4,
        tv_l1_weight: float = 0.0,
        l2_weight: float = 0.0,
        bn_weight: float = 0.0,
        first_bn_multiplier: float = 10.0,
        patch_entropy_weight: float = 0.0,
        jitter: int | None = None,
        flip: bool = True,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        labels: Literal["random", "balanced"] = "random",
        return_images: Literal["best", "last"] = "best",
        final_mask: Literal["tracked", "reselect", "release"] = "tracked",
        output_dir: str | None = None,
        overwrite: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        if iterations < 1 or batch_size < 1 or num_batches < 1:
            raise ValueError("model.init_args.iterations, batch_size and num_batches must be positive")
        self.automatic_optimization = False
        self.teacher = create_model(
            teacher, pretrained, teacher_checkpoint, teacher_kwargs, key="model.init_args.teacher"
        ).eval()
        self.teacher.requires_grad_(False)
        cfg = self.teacher.pretrained_cfg if hasattr(self.teacher, "pretrained_cfg") else {}
        chans = getattr(self.teacher, "in_chans", None) or cfg.get("input_size", (3,))[0]
        size = self._image_size(teacher_kwargs or {}, cfg)
        if len(mean) != chans or len(std) != chans:
            raise ValueError(f"model.init_args.mean/std need {chans} values for this teacher, got {len(mean)}/{len(std)}")
        if bn_weight > 0 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in self.teacher.modules()):
            raise ValueError("model.init_args.bn_weight > 0 needs a CNN teacher with BatchNorm2d layers")
        if patch_entropy_weight > 0 and not isinstance(self.teacher, vit_tokens.VisionTransformer):
            raise ValueError(f"model.init_args.patch_entropy_weight = {patch_entropy_weight} needs a ViT teacher "
                             f"(got {type(self.teacher).__name__}): set it to 0 or use a timm ViT/DeiT")
        self.num_classes = self.teacher.num_classes
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)
        self.images = torch.nn.Parameter(torch.zeros(batch_size, chans, size, size))
        self.register_buffer("labels", torch.zeros(batch_size, dtype=torch.long))
        self.register_buffer("best_images", torch.zeros(batch_size, chans, size, size))
        self.register_buffer("best_loss", torch.tensor(math.inf))
        n = self._num_patches()
        self.register_buffer("kept_index", torch.arange(n).repeat(batch_size, 1))
        self.register_buffer("best_keep_mask", torch.ones(batch_size, n, dtype=torch.bool))
        self._augment_next, self._record_scores_next = True, False
        self._scores: Tensor | None = None
        self._written: list[dict[str, Any]] = []  # manifest entries of the batches written so far
        self.register_load_state_dict_pre_hook(self._resize_kept_buffers)

    # ----------------------------------------------------------------------------------- setup
    @staticmethod
    def _image_size(kwargs: dict[str, Any], cfg: dict[str, Any]) -> int:
        size = kwargs.get("img_size", cfg.get("input_size", (3, 224, 224))[-1])
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def _is_vit(self) -> bool:
        return isinstance(self.teacher, vit_tokens.VisionTransformer)

    def _num_patches(self) -> int:
        if not self._is_vit():
            return 1  # a CNN has no tokens; the dense path never reads the index
        rows, cols = vit_tokens.grid_size(self.teacher)
        return rows * cols

    def train(self, mode: bool = True) -> SMIModule:
        super().train(mode)
        self.teacher.eval()  # frozen: BN statistics and dropout stay in inference mode
        return self

    def train_dataloader(self) -> ResumableRange:
        return ResumableRange(self.hparams.num_batches * self.hparams.iterations)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.images], lr=self.hparams.lr, betas=tuple(self.hparams.betas))

    def _output_dir(self) -> Path:
        return Path(self.hparams.output_dir or run_directory(self.trainer) / "inverted")

    def setup(self, stage: str) -> None:
        world = self.trainer.world_size
        if self.hparams.batch_size % world:
            raise ValueError(f"model.init_args.batch_size ({self.hparams.batch_size}) must divide by the {world} processes")
        if stage == "fit" and self.trainer.ckpt_path is None:  # a resumed run continues its own pool
            prepare_pool_dir(self._output_dir(), self.hparams.overwrite, self.global_rank == 0,
                             key="model.init_args.output_dir")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Scores recorded for a drop at the next step must survive a checkpoint between the two.
        checkpoint["smi_pending_scores"] = self._scores
        checkpoint["smi_written_batches"] = self._written

    def _resize_kept_buffers(self, _module: Any, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        # The kept-index buffer shrinks during inversion: take the saved shape before loading.
        if prefix + "kept_index" in state_dict:
            self.kept_index = torch.empty_like(state_dict[prefix + "kept_index"], device=self.device)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._scores = checkpoint.get("smi_pending_scores")
        self._written = list(checkpoint.get("smi_written_batches", []))

    # ------------------------------------------------------------------ SupportsTokenDropping
    def _require_vit(self) -> None:
        vit_tokens.require_vit(self.teacher, "model.init_args.teacher")

    def token_schedule_step(self) -> int:
        return self.global_step % self.hparams.iterations

    def token_schedule_length(self) -> int:
        return self.hparams.iterations

    def num_kept_patches(self) -> int:
        self._require_vit()
        return self.kept_index.shape[1]

    def prepare_token_drop(self) -> None:
        self._require_vit()
        self._augment_next, self._record_scores_next = False, True

    def drop_patches(self, keep: int) -> None:
        self._require_vit()
        if self._scores is None:
            raise RuntimeError("drop_patches needs the patch scores of the previous step (call prepare_token_drop first)")
        rows = self._rows()
        mine = vit_tokens.top_patches(self._scores[rows], keep, self.kept_index[rows])
        self.kept_index = self._gather_rows(mine)
        self._scores, self._augment_next = None, False

    # ------------------------------------------------------------------------------- training
    def _rows(self) -> slice:
        """The image rows this process optimises."""
        per_rank = self.hparams.batch_size // self.trainer.world_size
        return slice(self.global_rank * per_rank, (self.global_rank + 1) * per_rank)

    def _gather_rows(self, mine: Tensor) -> Tensor:
        if self.trainer.world_size == 1:
            return mine
        return self.all_gather(mine).flatten(0, 1)

    def _generator(self, *salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.hparams.seed, *salt)) % (2**63))

    def _start_batch(self, batch_id: int) -> None:
        """Fresh images ~ N(0, I) in normalised space, fresh targets, fresh Adam state, all patches."""
        gen = self._generator(batch_id)
        b, k = self.hparams.batch_size, self.num_classes
        with torch.no_grad():
            self.images.copy_(torch.randn(self.images.shape, generator=gen))
            clamp_to_pixel_range(self.images, self.mean, self.std)
        if self.hparams.labels == "balanced":
            labels = torch.arange(b) % k
        else:
            labels = torch.randint(k, (b,), generator=gen)
        self.labels = labels.sort().values.to(self.device)
        self.kept_index = torch.arange(self._num_patches(), device=self.device).repeat(b, 1)
        self.best_loss.fill_(math.inf)
        self.optimizers().optimizer.state.clear()
        # The augmentation flags stay as the token-dropping callback set them for this step (a drop
        # at step 1 records its scores at step 0); every step resets them when it ends.
        self._scores = None

    def _forward(self, x: Tensor, kept: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """Teacher logits (kept tokens for a ViT), optional scores, the weighted BN (CNN) / PSAQ (ViT) prior."""
        hp, vit = self.hparams, self._is_vit()
        weight = hp.patch_entropy_weight if vit else hp.bn_weight
        prior = None
        if weight > 0:
            prior = PatchSimilarityPrior(self.teacher) if vit else BatchNormStatsPrior(self.teacher, hp.first_bn_multiplier)
        with prior or contextlib.nullcontext():
            logits, scores = (self.teacher(x), None) if not vit else vit_tokens.forward_kept(
                self.teacher, x, None if kept.shape[1] == self._num_patches() else kept,
                return_cls_attention=self._record_scores_next)
        return logits, scores, weight * prior.loss() if prior else x.new_zeros(())

    def training_step(self, step: int, batch_idx: int) -> Tensor:
        hp = self.hparams
        batch_id, it = divmod(int(step), hp.iterations)
        if it == 0:
            self._start_batch(batch_id)
        rows, opt = self._rows(), self.optimizers()
        x, y, kept = self.images[rows], self.labels[rows], self.kept_index[rows]
        x_in = x
        if self._augment_next:
            jitter = hp.jitter if hp.jitter is not None else x.shape[-1] // 8
            x_in, shift, flipped = random_roll_flip(x, jitter, hp.flip, self._generator(batch_id, it, self.global_rank))
            if self._is_vit() and kept.shape[1] < self._num_patches():
                p = self.teacher.patch_embed.patch_size[0]
                kept = vit_tokens.remap_rolled_flipped(kept, vit_tokens.grid_size(self.teacher), p, shift, flipped)
        logits, scores, feature_prior = self._forward(x_in, kept)
        ce = F.cross_entropy(logits, y)
        # Eq. (1) of DeepInversion with SMI's defaults (CE + 1e-4 TV_l2); priors on the un-augmented
        # images of the whole (replicated) batch, see the module docstring. Terms whose weight is 0 are
        # not computed: on the full image they cost as much as a sparse block.
        priors = ((hp.tv_l2_weight, total_variation_l2), (hp.tv_l1_weight, total_variation_l1),
                  (hp.l2_weight, torch.linalg.vector_norm))
        prior = sum((w * fn(self.images) for w, fn in priors if w), self.images.new_zeros(()))
        own = hp.ce_weight * ce + feature_prior  # rank-local terms: they read this rank's rows
        loss = own + prior
        self._track_best(self.trainer.strategy.reduce(own.detach(), reduce_op="mean") + prior.detach())
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        with torch.no_grad():
            clamp_to_pixel_range(self.images, self.mean, self.std)
        if scores is not None:
            self._scores = self._gather_rows(scores)  # every rank (and a checkpoint) holds all rows
        self._augment_next, self._record_scores_next = True, False
        acc = (logits.argmax(-1) == y).float().mean()
        self.log_dict({"train/loss": loss.detach(), "train/loss_ce": ce.detach(), "train/acc": acc}, prog_bar=True)
        if it == hp.iterations - 1:
            self._finish_batch(batch_id)
        return loss.detach()

    @torch.no_grad()
    def _track_best(self, loss: Tensor) -> None:
        """Keep the images ``loss`` was computed on (before this step's update) if it is the lowest.

        ``loss`` is the whole batch's (equal on every rank), so every rank updates every row alike.
        ``torch.where`` instead of an ``if``: no read-back to the host per step. The release's
        ``best_inputs = inputs.data`` aliases the live tensor (the last iterate); a copy fixes that.
        """
        better = loss < self.best_loss
        self.best_loss.copy_(torch.where(better, loss, self.best_loss))
        self.best_images.copy_(torch.where(better, self.images.detach(), self.best_images))
        mask = torch.zeros_like(self.best_keep_mask).scatter_(1, self.kept_index, True)
        self.best_keep_mask.copy_(torch.where(better, mask, self.best_keep_mask))

    @torch.no_grad()
    def _finish_batch(self, batch_id: int) -> None:
        """De-normalise the returned images, mask dropped patches, write them and the manifest (rank 0)."""
        if self.hparams.return_images == "best":
            x, mask = self.best_images, self.best_keep_mask
            count = int(mask[0].sum())  # one read-back per batch; every row keeps the same count
            kept = mask.nonzero()[:, 1].view(len(mask), count)
        else:
            x, kept = self.images.detach(), self.kept_index
        mean, std = self.mean.view(1, -1, 1, 1), self.std.view(1, -1, 1, 1)
        if self._is_vit() and self.hparams.final_mask != "tracked" and kept.shape[1] < self._num_patches():
            kept = self._reselect(x, mean, std, kept.shape[1])
        dense = not self._is_vit() or kept.shape[1] == self._num_patches()
        pixels = x * std + mean
        if not dense:  # what a later stage sees: dropped patches black, the kept tokens only
            pixel_mask = vit_tokens.patch_mask_to_pixels(kept, vit_tokens.grid_size(self.teacher),
                                                         self.teacher.patch_embed.patch_size[0])
            pixels = pixels * pixel_mask
        logits, _, _ = self._forward((pixels - mean) / std, kept)  # the teacher on what is stored
        if self.global_rank != 0:
            return
        out = self._output_dir()
        patch = self.teacher.patch_embed.patch_size[0] if self._is_vit() else 1
        grid = vit_tokens.grid_size(self.teacher) if self._is_vit() else (1, 1)
        stem = out / f"batch_{batch_id:04d}"
        png = save_inverted_batch(stem, pixels, self.labels, kept, grid, patch, logits.argmax(-1))
        self._written = [e for e in self._written if e["file"] != stem.with_suffix(".pt").name]
        self._written.append({"file": stem.with_suffix(".pt").name, "images": len(pixels),
                              "kept_patches": int(kept.shape[1]) if self._is_vit() else 1})
        write_manifest(out, self._written, self._pool_settings())
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="inverted", images=[str(png)], step=self.global_step)

    def _reselect(self, x: Tensor, mean: Tensor, std: Tensor, tracked: int) -> Tensor:
        """Kept patches re-ranked by a dense forward on the final images (``final_mask`` != tracked)."""
        if self.hparams.final_mask == "reselect":
            _, scores = vit_tokens.forward_kept(self.teacher, x, None, return_cls_attention=True)
            return vit_tokens.top_patches(scores, tracked)
        # release: the teacher reads the de-normalised [0, 1] images, and K = int(tokens * prod(ratios))
        # counts the CLS token among the tokens (197 * 0.7^4 -> 47 where the inversion tracked 46)
        ratios = next(c for c in self.trainer.callbacks if hasattr(c, "keep_ratios")).keep_ratios
        _, scores = vit_tokens.forward_kept(self.teacher, x * std + mean, None, return_cls_attention=True)
        return vit_tokens.top_patches(scores, int((self._num_patches() + 1) * math.prod(ratios)))

    def _pool_settings(self) -> dict[str, Any]:
        """What produced the pool, for its manifest and card."""
        hp = self.hparams
        settings = {k: hp[k] for k in ("teacher", "teacher_kwargs", "teacher_checkpoint", "batch_size", "num_batches",
                                       "iterations", "lr", "ce_weight", "tv_l2_weight", "bn_weight", "labels",
                                       "patch_entropy_weight",
                                       "return_images", "final_mask", "seed")}
        settings["mean"], settings["std"] = list(hp.mean), list(hp.std)
        dropping = [c for c in self.trainer.callbacks if hasattr(c, "prune_iterations")]
        settings["prune_iterations"] = dropping[0].prune_iterations if dropping else []
        settings["keep_ratios"] = dropping[0].keep_ratios if dropping else []
        settings["patches"] = self._num_patches() if self._is_vit() else 1
        return settings
