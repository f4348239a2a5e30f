"""ASP: few-shot class-incremental learning with attention-aware self-adaptive prompts.

Chenxi Liu, Zhenyi Wang, Tianyi Xiong, Ruibo Chen, Yihan Wu, Junfeng Guo, Heng Huang, "Few-Shot
Class-Incremental Learning with Attention-Aware Self-Adaptive Prompt", ECCV 2024 (arXiv 2403.09857);
release DawnLIU35/FSCIL-ASP.

A frozen ViT gets prompt tokens at every block (VPT-Deep; the prompt outputs are dropped after each
block): task-invariant prompts (TIP, learned vectors, zero init) and self-adaptive task-specific prompts
(TSP) that a prompt encoder produces per image from the [CLS] feature of the frozen, unprompted backbone
and the layer's detached first TIP token, as a Gaussian sample. The TSP in use is
``avg_alpha * p_avg + (1 - avg_alpha) * sample``, with ``p_avg`` the mean TSP over the data. Only the
base session trains (CE with a cosine classifier + anchor loss + information-bottleneck KL); then class
prototypes (mean features) replace the classifier rows. Each incremental session updates ``p_avg`` by
EMA on its few shots and appends the new classes' prototypes; prediction is the nearest prototype by
cosine. ``prompts`` selects the baselines in the same code: ``vpt`` (TIP only), ``l2p`` (a prompt pool
with key-query matching instead of TIP/TSP), ``none`` (SimpleCIL: prototypes of the frozen backbone).

Equations (the paper's names; the release is the reference, see docs/methods/asp.md):
- TSP Gaussian, sigma = softplus(f_sigma(u) - 5), u = [TIP_l[0]; f(x)]   -> ``PromptEncoder.forward``
- TSP_l(x) = alpha p_avg,l + (1 - alpha)(mu + sigma * eps)              -> ``PromptedViT.forward`` (# TSP)
- L = L_CE + anchor_lambda L_anchor + kl_weight KL                      -> ``_base_loss`` (# Eq. L)
- anchor a_c = argmax_i cos(h(x_i), mean_c h)                           -> ``_refresh_anchors``
- p_avg <- beta p_avg + (1 - beta) mean_x mu(x)  (incremental sessions) -> ``_start_session`` (# EMA)
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from core.fscil import class_means, fscil_metrics, save_session_curves
from core.rng import keyed_generator
from core.run_dir import run_directory
from core.tensor_augment import random_crop_flip
from lit_modules.asp_parts import (
    CosineClassifier,
    PromptedViT,
    anchor_indices,
    anchor_loss,
    anchor_loss_per_copy,
    gaussian_kl,
)


class ASPModule(L.LightningModule):
    """ASP and its baselines on a ``core.protocols.TaskStream`` of FSCIL sessions (one task per session).

    Args:
        backbone: timm ViT name (the paper: ``vit_base_patch16_224``).
        pretrained: load timm's pretrained weights (from the local Hugging Face cache when offline).
        backbone_checkpoint: local weights for the backbone (safetensors from ``configs/asp/demo_pretrain.yaml``).
        backbone_kwargs: extra ``timm.create_model`` arguments (``img_size``, ``patch_size``, ``embed_dim``...).
        num_classes: classes of the whole stream (base + all sessions).
        prompts: ``asp`` (TIP + TSP), ``vpt`` (TIP only), ``l2p`` (prompt pool), ``none`` (SimpleCIL).
        tip_tokens: task-invariant prompt tokens per block (release: half of ``prompt_token_num``).
        tsp_tokens: task-specific tokens per block (``asp``), or tokens per pool prompt (``l2p``).
        tip_init: ``zero`` (release) or ``random`` (N(0, 1)).
        encoder_hidden: width of the prompt encoder's linear maps.
        avg_alpha: weight of ``p_avg`` in the TSP in use.
        perturb_var: scale of the TSP noise in training (0 at evaluation).
        ema_beta: EMA factor of ``p_avg`` in incremental sessions.
        anchor_lambda: weight of the anchor loss (0: the ``no_anchor`` ablation).
        kl_weight: weight of the information-bottleneck KL (0: the ``no_kl`` ablation).
        anchor_copies: ``per_class`` forwards each base anchor once per step (no grad) and weights its term
            by its batch count; ``per_sample`` is the release: one anchor copy per sample in the forward
            (the batch doubles, the KL also covers the copies).
        pool_size: prompts in the ``l2p`` pool.
        pool_top_k: pool prompts chosen per image.
        pool_lambda: weight of the ``l2p`` key pull loss.
        incremental_training: take gradient steps in incremental sessions (the release's ``fs_epoch`` > 0
            path: CE on the session's classes only); off in the paper.
        lr: SGD learning rate (cosine to 0 over the base session).
        incremental_lr: learning rate of the incremental sessions' steps (``incremental_training``; release 0.001).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        augment_padding: train-time random shift by up to this many pixels (0: none).
        image_size: resize batches to this side on the device (the release upsamples CIFAR 32 -> 224); None: as is.
        eval_batch_size: batch size of the passes over a session's training data (anchors, p_avg, prototypes).
        eval_each_epoch: evaluate after every base epoch while fitting (monitoring); off: only at session ends.
        plot: draw the accuracy-per-session curve (PNG in the run directory, W&B image) after the last session.
    """

    def __init__(
        self,
        backbone: str = "vit_base_patch16_224",
        pretrained: bool = False,
        backbone_checkpoint: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        num_classes: int = 100,
        prompts: Literal["asp", "vpt", "l2p", "none"] = "asp",
        tip_tokens: int = 3,
        tsp_tokens: int = 3,
        tip_init: Literal["zero", "random"] = "zero",
        encoder_hidden: int = 256,
        avg_alpha: float = 0.8,
        perturb_var: float = 1.0,
        ema_beta: float = 0.99,
        anchor_lambda: float = 0.1,
        kl_weight: float = 0.001,
        anchor_copies: Literal["per_class", "per_sample"] = "per_class",
        pool_size: int = 10,
        pool_top_k: int = 2,
        pool_lambda: float = 0.1,
        incremental_training: bool = False,
        lr: float = 0.01,
        incremental_lr: float = 0.001,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        augment_padding: int = 0,
        image_size: int | None = None,
        eval_batch_size: int = 256,
        eval_each_epoch: bool = False,
        plot: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # manual steps: sessions without training skip them on every rank (DDP forbids returning None)
        self.automatic_optimization = False
        self.net = PromptedViT(backbone, pretrained, backbone_checkpoint, backbone_kwargs, prompts, tip_tokens,
                               tsp_tokens, tip_init, encoder_hidden, avg_alpha, pool_size, pool_top_k, image_size)
        self.classifier = CosineClassifier(self.net.vit.embed_dim, num_classes)
        self.register_buffer("session", torch.tensor(-1))  # last finished session (-1: base still training)
        self._anchor_images: Tensor | None = None
        self._anchor_cls: Tensor | None = None
        self.history: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> Tensor:
        """Cosine logits over all stream classes at evaluation (no noise); callers slice the seen ones."""
        return self.classifier(self.net(images)[0])

    # ------------------------------------------------------------------ the stream
    def _stream(self) -> Any:
        return self.trainer.datamodule

    def _task(self) -> int:
        return self._stream().task_of_epoch(self.current_epoch)

    def _seen(self, session: int) -> int:
        return sum(len(c) for c in self.task_classes[: session + 1])

    def setup(self, stage: str) -> None:
        stream = self._stream()
        missing = [m for m in ("task_of_epoch", "is_task_end", "task_classes") if not hasattr(stream, m)]
        if missing:
            raise TypeError(f"data: ASPModule needs a TaskStream datamodule; {type(stream).__name__} lacks {missing}")
        self.task_classes = stream.task_classes()
        total = sum(len(c) for c in self.task_classes)
        if total != self.hparams.num_classes:
            raise ValueError(f"model.init_args.num_classes={self.hparams.num_classes} but the stream has {total} "
                             f"classes; set it to {total}")
        if not self.history:
            sessions = len(self.task_classes)
            self.history = {"correct": torch.zeros(sessions, sessions), "count": torch.zeros(sessions)}

    def _chunks(self, *tensors: Tensor | None) -> list[tuple[Tensor | None, ...]]:
        size = self.hparams.eval_batch_size
        return [tuple(None if t is None else t[i : i + size] for t in tensors) for i in range(0, len(tensors[0]), size)]

    @torch.no_grad()
    def _collect(self, data: Dataset) -> tuple[Tensor, Tensor, Tensor | None]:
        """Images, labels and (for ASP/L2P) frozen [CLS] features of a whole session, on the device.

        Every rank reads the whole session (no distributed sampler), so all ranks build identical state."""
        batches = list(DataLoader(data, batch_size=self.hparams.eval_batch_size, shuffle=False))
        images = torch.cat([b["image"] for b in batches]).to(self.device)
        labels = torch.cat([b["label"] for b in batches]).to(self.device)
        cls = None
        if self.hparams.prompts in ("asp", "l2p"):
            cls = torch.cat([self.net.frozen_features(x) for x, in self._chunks(images)])
        return images, labels, cls

    @torch.no_grad()
    def _features(self, images: Tensor, cls: Tensor | None) -> Tensor:
        """Evaluation-mode (noise-free) prompted features of a session, in chunks."""
        return torch.cat([self.net(x, cls=c)[0] for x, c in self._chunks(images, cls)])

    @torch.no_grad()
    def _mean_mu(self, cls: Tensor) -> Tensor:
        """The mean mu-prompt over a session (the release's Avg_TSP)."""
        return sum(self.net.mu(c).sum(0) for c, in self._chunks(cls)) / len(cls)

    def _session_data(self) -> Dataset:
        return self.trainer.train_dataloader.dataset

    def _write_prototypes(self, session: int, features: Tensor, labels: Tensor) -> None:
        classes = torch.tensor(self.task_classes[session], device=self.device)
        self.classifier.weight.data[classes] = class_means(features, labels, classes)

    # ------------------------------------------------------------------ sessions
    @torch.no_grad()
    def _refresh_anchors(self, data: Dataset) -> None:
        """Anchor images (closest to their class mean, current model) and, for ASP, p_avg reset to the mean mu."""
        images, labels, cls = self._collect(data)
        features = self._features(images, cls)  # with the previous epoch's p_avg, as the release
        base = torch.tensor(self.task_classes[0], device=self.device)
        index = anchor_indices(features, labels, base, class_means(features, labels, base))
        self._anchor_images = images[index]
        self._anchor_cls = None if cls is None else cls[index]
        if self.net.prompt_encoder is not None:
            self.net.p_avg.copy_(self._mean_mu(cls))

    @torch.no_grad()
    def _finish_base(self, data: Dataset) -> None:
        """After the last base epoch: final p_avg, then base prototypes replace the classifier rows."""
        if int(self.session) >= 0:
            return
        images, labels, cls = self._collect(data)
        if self.net.prompt_encoder is not None:
            self.net.p_avg.copy_(self._mean_mu(cls))
        self._write_prototypes(0, self._features(images, cls), labels)
        self.session.fill_(0)

    @torch.no_grad()
    def _start_session(self, session: int, data: Dataset) -> None:
        """Incremental session: EMA of p_avg on its few shots, then the new classes' prototypes."""
        images, labels, cls = self._collect(data)
        if self.net.prompt_encoder is not None:
            beta = self.hparams.ema_beta
            self.net.p_avg.mul_(beta).add_((1 - beta) * self._mean_mu(cls))  # EMA
        self._write_prototypes(session, self._features(images, cls), labels)
        self.session.fill_(session)

    def on_train_epoch_start(self) -> None:
        task = self._task()
        if task == 0:
            if self.hparams.prompts != "none":
                self._refresh_anchors(self._session_data())
            return
        if int(self.session) < task:
            self._start_session(task, self._session_data())

    def on_train_epoch_end(self) -> None:
        self.lr_schedulers().step()
        if self._task() == 0 and self._stream().is_task_end(self.current_epoch):
            self._finish_base(self._session_data())  # when no validation ran at the end of the base session

    # ------------------------------------------------------------------ training
    def _base_loss(self, images: Tensor, labels: Tensor) -> Tensor:
        hp, batch = self.hparams, images.shape[0]
        noise = hp.perturb_var
        anchor_term = images.new_zeros(())
        if hp.anchor_lambda > 0 and hp.anchor_copies == "per_sample":
            cls = None
            if self._anchor_cls is not None:
                cls = torch.cat([self.net.frozen_features(images), self._anchor_cls[labels]])
            features, extra = self.net(torch.cat([images, self._anchor_images[labels]]), noise, cls)
            features, copies = features[:batch], features[batch:]
            anchor_term = anchor_loss_per_copy(features, labels, copies)
        else:
            features, extra = self.net(images, noise)
            if hp.anchor_lambda > 0:
                with torch.no_grad():
                    anchors = self.net(self._anchor_images, noise, self._anchor_cls)[0]
                anchor_term = anchor_loss(features, anchors[labels])
        ce = F.cross_entropy(self.classifier(features)[:, : self._seen(0)], labels)
        kl = gaussian_kl(extra["mu"], extra["sigma"]) if "mu" in extra else images.new_zeros(())
        pull = extra.get("pull", images.new_zeros(()))
        loss = ce + hp.anchor_lambda * anchor_term + hp.kl_weight * kl + hp.pool_lambda * pull  # Eq. L
        self.log_dict({"train/loss": loss, "train/ce": ce, "train/anchor": anchor_term, "train/kl": kl,
                       "train/pull": pull}, prog_bar=True)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        task = self._task()
        if (task == 0 and self.hparams.prompts == "none") or (task > 0 and not self.hparams.incremental_training):
            return  # SimpleCIL and the incremental sessions of the paper take no gradient steps
        images, labels = batch["image"], batch["label"]
        if self.hparams.augment_padding:
            generator = keyed_generator(self.global_step, batch_idx, 23)
            images = random_crop_flip(images, self.hparams.augment_padding, False, generator)
        if task == 0:
            loss = self._base_loss(images, labels)
        else:
            low, high = self._seen(task - 1), self._seen(task)
            logits = self.classifier(self.net(images, self.hparams.perturb_var)[0])[:, low:high]
            loss = F.cross_entropy(logits, labels - low)  # old classes masked, as the release's fs path
            self.log("train/loss", loss, prog_bar=True)
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()

    # ------------------------------------------------------------------ evaluation
    def _evaluated_session(self) -> int:
        if self.trainer.state.fn == "fit":
            return self._task()
        return max(int(self.session), 0)

    def on_validation_epoch_start(self) -> None:
        fitting = self.trainer.state.fn == "fit" and not self.trainer.sanity_checking
        if fitting and self._task() == 0 and self._stream().is_task_end(self.current_epoch):
            self._finish_base(self._session_data())
        sessions = len(self.task_classes)
        self._correct = torch.zeros(sessions, device=self.device)
        self._count = torch.zeros(sessions, device=self.device)

    def _skips_evaluation(self) -> bool:
        fitting = self.trainer.state.fn == "fit" and not self.trainer.sanity_checking
        return fitting and not self.hparams.eval_each_epoch and not self._stream().is_task_end(self.current_epoch)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        session = self._evaluated_session()
        if dataloader_idx > session or self._skips_evaluation():
            return  # classes not seen yet, or a base epoch before the session's end
        logits = self(batch["image"])[:, : self._seen(session)]
        self._correct[dataloader_idx] += (logits.argmax(1) == batch["label"]).sum()
        self._count[dataloader_idx] += len(batch["label"])

    def _reduced(self) -> tuple[Tensor, Tensor]:
        if self.trainer.world_size > 1:
            return self.all_gather(self._correct).sum(0), self.all_gather(self._count).sum(0)
        return self._correct, self._count

    def _report(self, split: str) -> None:
        """Accuracy on the seen classes; at a session's end during fit, its row of the FSCIL history."""
        correct, count = self._reduced()
        session = self._evaluated_session()
        self.log(f"{split}/acc", correct[: session + 1].sum() / count[: session + 1].sum().clamp_min(1))
        finished = self.trainer.state.fn == "fit" and not self.trainer.sanity_checking
        if not (finished and self._stream().is_task_end(self.current_epoch) and int(self.session) == session):
            return
        self.history["correct"][session] = correct.cpu()
        self.history["count"] = count.cpu()
        metrics = self.session_metrics()
        self.log(f"{split}/acc_session_{session}", metrics["sessions"][-1])
        if session == len(self.task_classes) - 1:
            self.log_dict({f"{split}/avg_acc": metrics["avg"], f"{split}/pd": metrics["pd"], f"{split}/hm": metrics["hm"]})
            self._draw(metrics["sessions"])

    def on_validation_epoch_end(self) -> None:
        if not self._skips_evaluation():
            self._report("val")

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._report("test")

    def session_metrics(self) -> dict[str, Any]:
        """FSCIL metrics of the finished sessions (``core.fscil.fscil_metrics``)."""
        done = int(self.session) + 1
        return fscil_metrics(self.history["correct"][:done, :done], self.history["count"][:done])

    def _draw(self, accuracies: list[float]) -> None:
        out = run_directory(self.trainer)  # a collective call: every rank
        if not self.hparams.plot or self.global_rank != 0:
            return
        png = save_session_curves({self.hparams.prompts: accuracies}, out / "acc_per_session.png",
                                  f"FSCIL accuracy per session ({self.hparams.prompts})")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # W&B
                logger.log_image(key="val/acc_per_session", images=[str(png)])

    # ------------------------------------------------------------------ optimisation and checkpoints
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        stream = self._stream()
        base_epochs = next((e for e in range(10_000) if stream.task_of_epoch(e) > 0), 1)

        def cosine(epoch: int) -> float:  # cosine to 0 over the base session, the release's schedule
            if epoch >= base_epochs:
                return hp.incremental_lr / hp.lr
            return 0.5 * (1 + math.cos(math.pi * epoch / base_epochs))

        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, cosine)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["asp_history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = checkpoint["asp_history"]
