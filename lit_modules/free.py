"""FREE: Faster and Better Data-Free Meta-Learning (Wei, Hu, Wang, Shen, Yuan, Tao; CVPR 2024, arXiv 2405.00984).

Idea. The only training signal is a zoo of small pre-trained classifiers (teachers), each over a few
meta-train classes; their data is gone. Each step FREE samples ``teachers_per_step`` teachers and
recovers a task from each with a *meta-generator*: a copy of the generator is adapted to the teacher in
5 Adam steps and the generator learns, first-order, to be quickly adaptable (FIVE, "faster"). The
recovered images (i) train the meta-learner by implicit gradient alignment across the teachers
(sequential per-teacher distillation steps, Reptile-style: ``callbacks.gradient_alignment``, mode
``sequential``) and (ii) fill a memory pool of per-class images from which N-way K-shot pseudo-episodes
are drawn for MAML replay (BELL, "better"). Evaluation: MAML fine-tuning on real episodes of unseen
classes, 600 episodes, mean and 95 % CI.

Equations -> code:
    x = G_i(z), G_i adapted to teacher i in 5 steps on L_inv          -> ``core.meta_generator.adapt_generator``
    L_inv = CE(T_i(A(x)), y) + adv L_adv(S, T_i)  (adv after warm-up) -> ``core.dfml_losses.inversion_loss``
    grad G <- sum_i grad L_inv(G_i^(4)) (first-order meta-update)     -> ``_recover``
    theta <- theta - eta alpha (theta - theta_seq), KD steps per teacher -> ``_align`` (rule of the callback)
    MAML replay: theta' = theta - beta grad CE_support; CE_query(theta') -> ``_replay`` / ``core.maml.maml_query``

Release quirks, each a flag with the paper's intent as default: ``release_kl`` (probabilities passed to
``kl_div``), ``pool_last_teacher_only`` (the pool is written from the last teacher of the step only),
``generator_fresh_adam`` (a new Adam for the generator every step), ``stale_fast_weights`` (the next
step's adversarial student is the meta-learner adapted to the last replay episode), ``alias_teachers``
(the multi-architecture branch loads every sampled teacher into one module: all are the last one).
Model selection is on meta-val (``FewShotEpisodes.val_split``; ``meta_test`` is the release's choice).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.func import functional_call

from core.conv4 import Conv4
from core.dfml_losses import distill, inversion_loss
from core.episodic_evaluation import EpisodicEvaluation
from core.gradient_alignment import mean_gradient
from core.maml import adapt, maml_query, transductive
from core.meta_generator import Generator, adapt_generator
from core.model_zoo import distilled_shape, load_zoo
from core.rng import keyed_generator
from core.run_dir import run_directory
from core.task_pool import TaskPool
from core.tensor_augment import random_crop_flip
from lit_modules.free_parts import save_recovered_grid


class FREEModule(EpisodicEvaluation, L.LightningModule):
    """Data-free meta-learning from a model zoo with a meta-generator, gradient alignment and a task pool.

    Args:
        zoo: manifest (or its folder) of the teacher zoo written by ``lit_modules.model_zoo.ZooModule``.
        hidden: channels of the Conv4 meta-learner (release 32).
        nz: generator latent size (release 256).
        ngf: generator width (release 64).
        teachers_per_step: teachers sampled per step (release 4).
        images_per_class: synthetic images per class per teacher (release 20, i.e. 100 per teacher).
        generator_steps: adaptation steps of the generator per teacher (release 5).
        generator_lr: Adam learning rate of generator and latents (release 1e-3, betas 0.5/0.999).
        ce_weight: weight of the teacher CE in the inversion loss (release ``oh`` 1).
        adv_weight: weight of the hard-sample term after warm-up (release 1).
        bn_weight: weight of DeepInversion's BN-statistics term (release 0: off in FREE).
        warmup: steps that train only the generator (release 20).
        augment_padding: random-crop padding of the differentiable augmentation (release 4).
        augment_flip: random horizontal flips (release on; off for characters).
        alignment: take the implicit gradient alignment step on the recovered batches (off: replay only).
        outer_lr: Adam learning rate of the meta-learner (release 1e-3), shared by alignment and replay.
        replay_n_way: classes of replay episodes (the teachers' class count: the learner's head width).
        replay_k_shot: support images per class of replay episodes (match the evaluation's k_shot).
        replay_q_query: query images per class of replay episodes (release 15).
        inner_steps: MAML inner SGD steps in replay (release 5).
        inner_lr: MAML inner learning rate (release 0.01).
        first_order: first-order MAML in replay (release ``--approx``; default second order).
        episode_batch: episodes per replay meta-update (release 10).
        replay_batches: most replay meta-updates per step.
        replay_patience: stop replay after this many meta-updates without a better mean query accuracy
            (release 10; one host read per meta-update); 0 runs all ``replay_batches``.
        pool_capacity: images kept per class in the pool (release 20 writes x 20).
        pool_quantize: store pool images as uint8 (the release's PNG round-trip).
        evaluation: ``maml`` (fine-tune ``test_steps`` steps, the paper's protocol) or ``protonet``.
        test_steps: MAML fine-tuning steps at evaluation (release 10).
        test_lr: fine-tuning learning rate at evaluation (release 0.01).
        release_kl: probabilities passed to ``kl_div`` in KD and the hard-sample term (release).
        pool_last_teacher_only: write only the last teacher's images to the pool (release).
        generator_fresh_adam: reset the generator's Adam every step (release).
        stale_fast_weights: the adversarial student is the last replay episode's adapted learner (release).
        alias_teachers: every sampled teacher is the last one (release's multi-architecture branch).
        holdout_teachers: the last this many teachers of the zoo are never sampled (held out, e.g. to
            measure how fast the trained meta-generator adapts to an unseen teacher).
        picture_every: steps between recovered-image PNGs under the run directory (0: only at the end).
        rng_seed: seed of teacher draws, latents, augmentation and replay episodes (keyed by step).
    """

    def __init__(self, zoo: str = "runs/free/demo/zoo", hidden: int = 32, nz: int = 256, ngf: int = 64,
                 teachers_per_step: int = 4, images_per_class: int = 20, generator_steps: int = 5,
                 generator_lr: float = 1e-3, ce_weight: float = 1.0, adv_weight: float = 1.0, bn_weight: float = 0.0,
                 warmup: int = 20, augment_padding: int = 4, augment_flip: bool = True, alignment: bool = True,
                 outer_lr: float = 1e-3, replay_n_way: int = 5, replay_k_shot: int = 5, replay_q_query: int = 15,
                 inner_steps: int = 5,
                 inner_lr: float = 0.01, first_order: bool = False, episode_batch: int = 10,
                 replay_batches: int = 10, replay_patience: int = 10, pool_capacity: int = 400,
                 pool_quantize: bool = False, evaluation: Literal["maml", "protonet"] = "maml",
                 test_steps: int = 10, test_lr: float = 0.01, release_kl: bool = False,
                 pool_last_teacher_only: bool = False, generator_fresh_adam: bool = False,
                 stale_fast_weights: bool = False, alias_teachers: bool = False, picture_every: int = 0,
                 holdout_teachers: int = 0, rng_seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        if evaluation not in ("maml", "protonet"):
            raise ValueError(f"model.init_args.evaluation={evaluation!r}: use maml or protonet")
        if teachers_per_step < 1 or generator_steps < 1:
            raise ValueError("model.init_args.teachers_per_step and generator_steps must be at least 1")
        teachers, self.records, meta = load_zoo(zoo, key="model.init_args.zoo")
        if not 0 <= holdout_teachers <= len(teachers) - teachers_per_step:
            raise ValueError(f"model.init_args.holdout_teachers={holdout_teachers} leaves fewer than "
                             f"teachers_per_step={teachers_per_step} of the zoo's {len(teachers)} teachers")
        self.n_classes_teacher, self.channels, self.image_size = distilled_shape(self.records, replay_n_way)
        self.teachers = torch.nn.ModuleList(teachers)
        self.register_buffer("classes", torch.tensor([r.classes for r in self.records]), persistent=False)
        with torch.random.fork_rng(devices=[]):  # initial weights depend on rng_seed only, not on the global RNG
            torch.manual_seed(rng_seed)
            self.learner = transductive(Conv4(self.channels, hidden, replay_n_way, self.image_size))
            self.generator = Generator(nz, ngf, self.image_size, self.channels)
        n_classes = meta.get("n_classes", int(self.classes.max()) + 1)
        self.pool = TaskPool(n_classes, pool_capacity, pool_quantize)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self.init_selection()
        self.gradient_rule: Any = None
        self._stale: dict[str, Tensor] | None = None
        self._last_images: list[Tensor] = []

    def train(self, mode: bool = True) -> FREEModule:
        super().train(mode)
        self.teachers.eval()  # teachers are frozen classifiers: their BatchNorm uses the running statistics
        return self

    # --- SupportsGradientAlignment ---------------------------------------------------------------
    def alignment_parameters(self) -> dict[str, Tensor]:
        return dict(self.learner.named_parameters())

    def set_gradient_rule(self, rule: Any) -> None:
        self.gradient_rule = rule

    # --- training ----------------------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        return [torch.optim.Adam(self.learner.parameters(), lr=hp.outer_lr),
                torch.optim.Adam(self.generator.parameters(), lr=hp.generator_lr, betas=(0.5, 0.999))]

    def _augment(self, images: Tensor, key: tuple[int, ...]) -> Tensor:
        hp = self.hparams
        return random_crop_flip(images, hp.augment_padding, hp.augment_flip, keyed_generator(hp.rng_seed, *key))

    def _student(self) -> Any:
        params = self._stale or {k: v.detach() for k, v in self.learner.named_parameters()}
        return lambda x: functional_call(self.learner, params, (x,))

    def _recover(self, step: int, warm: bool) -> list[tuple[int, Tensor]]:
        """Adapt the meta-generator to each sampled teacher; first-order meta-update (sum of last-step grads)."""
        hp = self.hparams
        ids = torch.randperm(len(self.teachers) - hp.holdout_teachers, generator=keyed_generator(hp.rng_seed, step, 0))[:hp.teachers_per_step]
        ids = ids.tolist()
        if hp.alias_teachers:
            ids = [ids[-1]] * len(ids)
        opt = self.optimizers()[1]
        if hp.generator_fresh_adam:
            opt.optimizer.state.clear()  # the release builds a new Adam every step
        n = self.n_classes_teacher * hp.images_per_class
        targets = torch.arange(n, device=self.device) % self.n_classes_teacher  # latent i -> class i mod C
        student = None if warm else self._student()
        meta_grads = [torch.zeros_like(p) for p in self.generator.parameters()]
        out = []
        for j, t in enumerate(ids):
            z = torch.randn(n, hp.nz, generator=keyed_generator(hp.rng_seed, step, 1, j)).to(self.device)
            views = keyed_generator(hp.rng_seed, step, 2, j)  # one stream per teacher: a new view per iteration
            loss_fn = inversion_loss(self.teachers[t], targets,
                                     lambda x, g=views: random_crop_flip(x, hp.augment_padding, hp.augment_flip, g),
                                     student, hp.ce_weight, hp.adv_weight, hp.bn_weight, hp.release_kl)
            images, grads, loss = adapt_generator(self.generator, z, loss_fn, hp.generator_steps, hp.generator_lr)
            for acc, g in zip(meta_grads, grads):
                if g is not None:
                    acc.add_(g)
            out.append((t, images))
            self.log("train/inversion_loss", loss, on_step=True)
        for p, g in zip(self.generator.parameters(), meta_grads):
            p.grad = g
        opt.step()
        return out

    def _align(self, step: int, recovered: list[tuple[int, Tensor]]) -> None:
        """Implicit gradient alignment: one update of the learner from the per-teacher KD losses."""
        hp = self.hparams
        xs = [self._augment(x, (step, 3, j)) for j, (_, x) in enumerate(recovered)]
        with torch.no_grad():
            targets = [self.teachers[t](x) for (t, _), x in zip(recovered, xs)]

        def loss_fn(params: dict[str, Tensor], i: int) -> Tensor:
            return distill(functional_call(self.learner, params, (xs[i],)), targets[i], hp.release_kl)

        rule = self.gradient_rule or mean_gradient
        grads = rule(loss_fn, self.alignment_parameters(), len(xs))
        opt = self.optimizers()[0]
        for name, p in self.learner.named_parameters():
            p.grad = grads[name]
        opt.step()

    def _replay(self, step: int) -> None:
        """MAML on pool episodes until ``replay_patience`` meta-updates bring no better query accuracy."""
        hp = self.hparams
        opt, best, waited = self.optimizers()[0], -1.0, 0
        for b in range(hp.replay_batches):
            support, query, _ = self.pool.sample(hp.replay_n_way, hp.replay_k_shot, hp.replay_q_query, hp.episode_batch,
                                                 keyed_generator(hp.rng_seed, step, 4, b))
            support, query = support.to(self.device), query.to(self.device)
            params = dict(self.learner.named_parameters())
            loss, acc = maml_query(self.learner, params, support, query, hp.inner_steps, hp.inner_lr, hp.first_order)
            opt.zero_grad()
            self.manual_backward(loss.sum())  # the release sums the episodes' query losses
            opt.step()
            self.log("train/replay_loss", loss.mean().detach(), on_step=True)
            if hp.replay_patience:
                mean = float(acc.mean())  # the stopping rule is data-dependent: one host read per meta-update
                best, waited = (mean, 0) if mean > best else (best, waited + 1)
                if waited >= hp.replay_patience:
                    break
        if hp.stale_fast_weights:
            ys = torch.arange(hp.replay_n_way, device=self.device).repeat_interleave(hp.replay_k_shot)
            fast = adapt(self.learner, {k: v.detach() for k, v in self.learner.named_parameters()},
                         support[-1].flatten(0, 1), ys, hp.inner_steps, hp.inner_lr, first_order=True)
            self._stale = {k: v.detach() for k, v in fast.items()}

    def training_step(self, batch: int, batch_idx: int) -> None:
        hp = self.hparams
        step = int(self.step_count)
        warm = step < hp.warmup
        recovered = self._recover(step, warm)
        self._last_images = [x for _, x in recovered]
        if not warm:
            written = recovered[-1:] if hp.pool_last_teacher_only else recovered
            for t, x in written:
                self.pool.add(x, self.classes[t][torch.arange(len(x), device=x.device) % self.n_classes_teacher])
            if hp.alignment:
                self._align(step, recovered)
            self._replay(step)
        if hp.picture_every and step % hp.picture_every == 0:
            self._picture(f"recovered_step{step:05d}")
        self.step_count += 1

    # --- pictures, evaluation, state -----------------------------------------------------------------
    def _run_dir(self) -> Path:
        """The run's own folder (a collective call: every rank must make it)."""
        return run_directory(self.trainer)

    def _picture(self, name: str) -> None:
        if not self._last_images:
            return
        folder = self._run_dir()
        if not self.trainer.is_global_zero:
            return
        png = save_recovered_grid(self._last_images, folder / "recovered" / f"{name}.png",
                                  per_row=2 * self.n_classes_teacher)
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="recovered", images=[str(png)], step=self.global_step)

    def on_train_end(self) -> None:
        self._picture("recovered_final")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["free"] = {"pool": self.pool.state_dict(), **self.selection_state(), "stale": self._stale}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["free"]
        self.pool.load_state_dict(state["pool"])
        self.load_selection_state(state)
        self._stale = state["stale"]
