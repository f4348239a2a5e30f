"""Bayesian sample weighting: the data scheduler of BDS as a reusable callback.

Hu et al., "Adaptive Defense against Harmful Fine-Tuning for Large Language Models via Bayesian Data
Scheduler", NeurIPS 2025. Each fine-tuning sample i has a latent weight sigma(w)_i. Before a step
the callback hands the batch's weights to the module (step 1); the module updates theta on the
alignment loss plus the weighted loss (Eq. 7); then the callback updates the scheduler on the
batch's detached per-sample losses (Eq. 8 scalar, Eq. 11 neural):

    w <- w - eta grad_w [ 1/B sum_i sigma(w)_i (l_i(theta) - lambda l_i(theta_ref)) - log p(w) ] (+ noise)

Samples that fit worse than the weighted average lose weight, the others gain (softmax: the weights
always average 1). ``lambda`` (``reference_weight``) is the paper's safety-agnostic reference term
(the release leaves it unimplemented: default 0); the module supplies l_i(theta'): a second LoRA adapter
trained on the weighted D_ft only (``reference_adapter: true``, the posterior's p(D_ft | w)^-1 factor) or, as
a cheaper stand-in, the starting model with its adapters off. Langevin noise sqrt(2 eta T) N(0, I) on the scheduler's
parameters after each of its steps samples the weights instead of point-estimating them; unlike the
paper's SGLD over the joint posterior it leaves theta noise-free, and the release adds none (default
T = 0). Losses are those
of the LLM step just taken (``pre_update``, the release: no extra forward) or recomputed after it
(``post_update``: one extra forward per step).

Scalar scheduler: one logit per sample, softmax over all N, AdamW on all N (release defaults 5e-3,
(0.9, 0.95), wd 0, clip 10, init 0.1). Neural scheduler: text encoder + pooling + linear head, softmax
over the (global) batch; trained here (the release's guard skipped its update), saved with
``save_dir`` and reloaded with ``pretrained`` (``trainable: false`` weights a new set as is).

Distributed: indices, losses, sources and encoder inputs are all-gathered before the update and
every rank runs the same update with the same noise, so the scheduler state is identical everywhere
and equals a single-process run on the same global batch. Source labels are used for monitoring
only (mean weight harmful vs benign, AUROC of -weight as a harmful detector, W&B histograms).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc

from core.data_scheduler import NeuralScheduler, ScalarScheduler
from core.packaged_models import resolve_model
from core.protocols import SupportsSampleWeighting, require_protocol
from core.rng import keyed_generator
from core.run_dir import run_directory
from core.sample_weights import (
    TRANSFORMS,
    Transform,
    gaussian_negative_log_prior,
    negative_entropy,
    plot_weight_history,
)

RELEASE_INIT = {"softmax": 0.1, "sigmoid": -1e-4, "identity": -1e-4}
"""The release's initial logit per transform (``--init`` for softmax, the hard-coded -1e-4 otherwise)."""

ARGS = "BayesianDataScheduler init_args."
"""Prefix of the config keys that error messages name (the callback sits in ``trainer.callbacks``)."""


class BayesianDataScheduler(L.Callback):
    """Learn one weight per fine-tuning sample (scalar) or a weighting network (neural).

    Args:
        scheduler: ``scalar`` (one logit per sample) or ``neural`` (encoder + pooling + head).
        transform: sigma: ``softmax`` (paper default), ``sigmoid`` or ``identity``.
        init: initial scalar logit; ``None``: the release's value for the transform (softmax 0.1, i.e. uniform
            weights 1; sigmoid and identity -1e-4, i.e. weights about 1 and about 0 at the start).
        lr: scheduler AdamW learning rate (release 5e-3).
        betas: scheduler AdamW betas (release (0.9, 0.95)).
        weight_decay: scheduler AdamW weight decay (release 0).
        grad_clip: scheduler gradient-norm clip (release 10; 0 disables).
        loss_timing: ``pre_update`` (the losses of the LLM step just taken, release) or
            ``post_update`` (recomputed with the updated LLM, one extra forward per step).
        langevin_temperature: T of the Langevin noise sqrt(2 lr T) N(0, I) added to the scheduler's parameters
            after each update (0: off, the release; the paper's SGLD would also perturb theta).
        reference_weight: lambda of the safety-agnostic reference term (0: off, the release).
        entropy_weight: coefficient of the negative-entropy prior (pulls towards uniform weights; scalar).
        gaussian_prior_weight: coefficient of the Gaussian prior N(init, gaussian_prior_std^2) on the logits
            (scalar).
        gaussian_prior_std: std of that prior.
        encoder: neural scheduler's text encoder: ``minilm`` (offline all-MiniLM-L6-v2), a Hugging Face
            id or a local folder (release: fairseq-dense-125M).
        pooling: neural pooling: ``mean`` (release), ``first`` or ``last``.
        max_length: encoder tokens per sample.
        train_encoder: train the encoder with the head (release); False trains the head only.
        pretrained: folder of a saved neural scheduler to start from.
        trainable: False freezes the scheduler (weights a new set with a pretrained one, no retraining).
        save_dir: where the neural scheduler is saved (safetensors) when fitting ends.
        seed: seed of the Langevin noise.
    """

    def __init__(
        self,
        scheduler: Literal["scalar", "neural"] = "scalar",
        transform: Transform = "softmax",
        init: float | None = None,
        lr: float = 5e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        grad_clip: float = 10.0,
        loss_timing: Literal["pre_update", "post_update"] = "pre_update",
        langevin_temperature: float = 0.0,
        reference_weight: float = 0.0,
        entropy_weight: float = 0.0,
        gaussian_prior_weight: float = 0.0,
        gaussian_prior_std: float = 1.0,
        encoder: str = "minilm",
        pooling: Literal["mean", "first", "last"] = "mean",
        max_length: int = 128,
        train_encoder: bool = True,
        pretrained: str | None = None,
        trainable: bool = True,
        save_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        if scheduler not in ("scalar", "neural"):
            raise ValueError(f"{ARGS}scheduler must be scalar or neural, got {scheduler!r}")
        if transform not in TRANSFORMS:
            raise ValueError(f"{ARGS}transform must be one of {', '.join(TRANSFORMS)}, got {transform!r}")
        if langevin_temperature < 0 or lr <= 0 or gaussian_prior_std <= 0:
            raise ValueError(f"{ARGS}langevin_temperature must be >= 0, lr and gaussian_prior_std > 0")
        if scheduler == "scalar" and (pretrained or not trainable):
            raise ValueError(f"{ARGS}pretrained / trainable: false apply to the neural scheduler only")
        if scheduler == "neural" and (entropy_weight or gaussian_prior_weight):
            raise ValueError(f"{ARGS}entropy_weight / gaussian_prior_weight are priors on the scalar scheduler's "
                             "logits; the neural scheduler has none: set them to 0")
        self.kind, self.transform = scheduler, transform
        self.init = RELEASE_INIT[transform] if init is None else init
        self.opt_args = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay}
        self.grad_clip, self.loss_timing, self.temperature = grad_clip, loss_timing, langevin_temperature
        self.reference_weight, self.entropy_weight = reference_weight, entropy_weight
        self.gaussian_prior_weight, self.gaussian_prior_std = gaussian_prior_weight, gaussian_prior_std
        self.encoder_args = {"encoder": encoder, "pooling": pooling, "max_length": max_length}
        self.train_encoder, self.pretrained, self.trainable, self.save_dir = train_encoder, pretrained, trainable, save_dir
        self.seed = seed
        self.net: ScalarScheduler | NeuralScheduler | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.sources: Tensor | None = None  # scalar: source label per dataset index (-1 unseen), monitoring only
        self._epoch_scores: list[tuple[Tensor, Tensor]] = []  # neural: (weight, source) seen this epoch
        self.history: list[dict[str, float]] = []  # per-epoch weight statistics, drawn at the end of fit
        self._batch: dict[str, Tensor] = {}
        self._applied: Tensor | None = None  # (2, N): sum and count of the weights applied to each row (scalar)
        self._pending: dict[str, Any] | None = None

    # ------------------------------------------------------------------ construction and state
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_protocol(pl_module, SupportsSampleWeighting, type(self).__name__)
        if stage != "fit" or self.net is not None:
            return
        if self.kind == "scalar":
            n = pl_module.num_weighted_samples()
            self.net = ScalarScheduler(n, self.init)
            self.sources = torch.full((n,), -1, dtype=torch.long)
            self._applied = torch.zeros(2, n)
        elif self.pretrained:
            self.net = NeuralScheduler.from_pretrained(self.pretrained)
        else:
            args = {**self.encoder_args, "encoder": resolve_model(self.encoder_args["encoder"])}
            self.net = NeuralScheduler(**args)
        self.net.eval()  # no dropout: weights are deterministic and identical on every rank
        if self.kind == "neural" and not self.train_encoder:
            self.net.encoder.requires_grad_(False)
        params = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, **self.opt_args) if self.trainable else None
        if self._pending is not None:
            self.load_state_dict(self._pending)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.net.to(pl_module.device)
        if self.sources is not None:
            self.sources, self._applied = self.sources.to(pl_module.device), self._applied.to(pl_module.device)
        if self.kind == "scalar" and not self.history:  # epoch 0: the initial weights (all equal)
            self.history.append({"epoch": 0, "step": 0, "weight_mean_harmful": float(self.all_weights().mean()),
                                 "weight_mean_benign": float(self.all_weights().mean())})
        if self.optimizer is not None:  # state restored before the move stays on its old device otherwise
            for state in self.optimizer.state.values():
                for key, value in state.items():
                    if isinstance(value, Tensor) and key != "step":
                        state[key] = value.to(pl_module.device)

    def state_dict(self) -> dict[str, Any]:
        if self.net is None:
            return {}
        return {"kind": self.kind, "net": self.net.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "sources": None if self.sources is None else self.sources.cpu(),
                "applied": None if self._applied is None else self._applied.cpu(),
                "history": list(self.history), "epoch_scores": [(w.cpu(), src.cpu()) for w, src in self._epoch_scores]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.net is None:  # restored before setup: apply once the scheduler exists
            self._pending = state_dict
            return
        if state_dict["kind"] != self.kind:
            raise ValueError(f"the checkpoint holds a {state_dict['kind']} scheduler: set {ARGS}scheduler to it")
        if self.kind == "scalar" and state_dict["net"]["logits"].shape != self.net.logits.shape:
            raise ValueError(f"the checkpoint's scheduler weights {state_dict['net']['logits'].numel()} fine-tuning "
                             f"samples, the data has {self.net.logits.numel()}: resume with the checkpoint's data "
                             "settings (data.init_args.num_finetune, max_length)")
        self.net.load_state_dict(state_dict["net"])
        if self.optimizer is not None and state_dict["optimizer"] is not None:
            self.optimizer.load_state_dict(state_dict["optimizer"])
        self.sources = state_dict["sources"]
        self._applied = state_dict.get("applied", self._applied)
        self.history = list(state_dict.get("history", []))
        self._epoch_scores = list(state_dict.get("epoch_scores", []))
        self._pending = None

    # ------------------------------------------------------------------ the two steps
    def _gather(self, pl_module: L.LightningModule, value: Tensor) -> Tensor:
        gathered = pl_module.all_gather(value)
        return gathered.flatten(0, 1) if pl_module.trainer.world_size > 1 else gathered

    @torch.no_grad()
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        info = pl_module.sample_weighting_batch(batch)
        device = pl_module.device
        index = info["index"].to(device)
        source = info["source"] if info["source"] is not None else torch.full_like(index, -1)
        self._batch = {"index": self._gather(pl_module, index), "source": self._gather(pl_module, source.to(device))}
        if self.kind == "scalar":
            weights = self.net.weights(index, self.transform)  # Step 1: look up w_i
            self._applied.index_add_(1, index, torch.stack([weights.float(), torch.ones_like(weights.float())]))
        else:  # Step 1: w_i = N(z_i; phi), softmax over the global batch (every rank computes all of it)
            ids, mask = self.net.tokenize(info["text"])
            ids, mask = self._gather(pl_module, ids.to(device)), self._gather(pl_module, mask.to(device))
            # The scheduler only changes after the step, so Eq. (11) reuses this forward (and its graph).
            with torch.set_grad_enabled(self.optimizer is not None):
                self._batch["weights"] = self.net.batch_weights(ids, mask, self.transform)
            all_weights = self._batch["weights"].detach()
            rank, size = trainer.global_rank, len(index)
            weights = all_weights[rank * size : (rank + 1) * size]
            self._epoch_scores.append((all_weights.float(), self._batch["source"]))
        pl_module.set_sample_weights(weights)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.sources is not None:
            self.sources[self._batch["index"]] = self._batch["source"]
        if self.optimizer is None:
            return
        _, losses = pl_module.last_sample_losses()
        if self.loss_timing == "post_update":
            losses = pl_module.recompute_sample_losses()
        losses = self._gather(pl_module, losses.detach().float())
        if self.reference_weight:  # -lambda l_i(theta'): see reference_adapter of lit_modules.bds.BDSModule
            losses = losses - self.reference_weight * self._gather(pl_module, pl_module.reference_sample_losses().float())
        with torch.enable_grad():
            objective = self._objective(losses)
            self.optimizer.zero_grad(set_to_none=True)
            objective.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        if self.temperature > 0:  # Langevin: noise keyed by (seed, step), drawn on the device, equal on every rank
            std = math.sqrt(2.0 * self.opt_args["lr"] * self.temperature)
            generator = keyed_generator(self.seed, trainer.global_step, device=params[0].device)
            with torch.no_grad():
                for p in params:
                    p.add_(torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) * std)
        pl_module.log("train/scheduler_objective", objective.detach(), on_step=True, on_epoch=False)

    def _objective(self, losses: Tensor) -> Tensor:
        """Eq. (8)/(11): mean_i sigma(w)_i l_i over the global batch, plus the priors (-log p(w))."""
        if self.kind == "scalar":
            weights = self.net.weights(self._batch["index"], self.transform)
        else:  # computed with its graph before the step (the scheduler has not changed since)
            weights = self._batch["weights"]
        objective = (weights * losses.to(weights)).mean()
        if self.entropy_weight:  # scalar only (checked in __init__)
            objective = objective + self.entropy_weight * negative_entropy(self.net.logits)
        if self.gaussian_prior_weight:
            prior = gaussian_negative_log_prior(self.net.logits, self.init, self.gaussian_prior_std)
            objective = objective + self.gaussian_prior_weight * prior
        return objective

    # ------------------------------------------------------------------ monitoring and export
    def all_weights(self) -> Tensor:
        """(N,) current weights of the whole fine-tuning set (scalar scheduler)."""
        if self.kind != "scalar" or self.net is None:
            raise RuntimeError("all_weights() needs a fitted scalar scheduler")
        with torch.no_grad():
            return self.net.all_weights(self.transform).detach().cpu()

    def applied_weights(self) -> Tensor:
        """(N,) time average of the weights applied to each row over training (its own visits; the weights the
        LLM step actually used, unlike the final ones); rows never visited get the final weight."""
        if self._applied is None:
            raise RuntimeError("applied_weights() needs a fitted scalar scheduler")
        total, count = self._applied.detach().cpu()
        return torch.where(count > 0, total / count.clamp(min=1), self.all_weights())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.kind == "scalar":
            weights, sources = self.all_weights(), self.sources.cpu()
        elif self._epoch_scores:
            weights, sources = (torch.cat(x).cpu() for x in zip(*self._epoch_scores))
        else:
            return
        self._epoch_scores = []
        stats = weight_statistics(weights, sources)
        self.history.append({"epoch": trainer.current_epoch + 1, "step": trainer.global_step, **stats})
        for name, value in stats.items():
            pl_module.log(f"train/{name}", value, on_step=False, on_epoch=True, sync_dist=False)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                import wandb

                logger.experiment.log({"train/weight_histogram": wandb.Histogram(weights.numpy()),
                                       "trainer/global_step": trainer.global_step})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = run_directory(trainer)  # collective: every rank
        if not trainer.is_global_zero:
            return
        if self.kind == "neural" and self.save_dir:
            self.net.save_pretrained(self.save_dir)
        if self.history:
            png = plot_weight_history(self.history, folder / "bds_weights.png",
                                      f"{self.kind} scheduler: weights of harmful vs benign rows")
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key="train/weights_over_training", images=[str(png)])


def weight_statistics(weights: Tensor, sources: Tensor) -> dict[str, float]:
    """Mean weight of harmful (source 1) and benign (0) samples, and the AUROC of -weight as a
    harmful-data detector; entries whose source is unknown (-1) are left out."""
    known = sources >= 0
    weights, sources = weights[known].float(), sources[known]
    stats: dict[str, float] = {}
    for name, label in (("weight_mean_benign", 0), ("weight_mean_harmful", 1)):
        if (sources == label).any():
            stats[name] = float(weights[sources == label].mean())
    if (sources == 0).any() and (sources == 1).any():
        stats["weight_auroc"] = float(binary_auroc(-weights, sources))
    return stats
