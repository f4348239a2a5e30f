"""TGR: Task Groupings Regularization for data-free meta-learning with heterogeneous pre-trained models
(Wei, Hu, Shen, Wang, Li, Yuan, Tao; ICML 2024, arXiv 2405.16560).

Idea. A zoo of teachers trained on different tasks (classes, domains, architectures) is heterogeneous:
homogeneous teachers conflict less but teach little, heterogeneous ones teach more but their gradients
conflict. TGR embeds every teacher in a task space (the diagonal Fisher of a fixed probe on images
inverted from the teacher), groups the teachers so that each group collects mutually *dissimilar* ones
(spectral clustering with 1 - S as the affinity), and at every step samples one group, recovers a task
from each of a few of its teachers (a fresh generator per teacher, CE + BatchNorm statistics) and
trains the meta-learner with implicit gradient regularisation inside the group, then replays MAML on
pseudo-episodes of the memory pool as FREE does.

Equations -> code:
    x_i = argmin_G CE(T_i(A(G(z))), y) + R_BN(T_i)  (fresh G, keep best)  -> ``_recover`` (``core.teacher_inversion``)
    F_k = E (grad_phi CE(probe(x_k), y))^2; S = normalised cosine; D = 1 - S -> ``_compute_groups``
    groups = SpectralClustering(affinity = D)                              -> ``core.task_similarity.group_models``
    L_i = KD(S_theta(x_i), T_i(x_i)) + gt CE(S_theta(x_i), y)             -> ``_align`` (loss_fn)
    theta <- theta - eta grad (1/n) sum_i L_i(theta - alpha (g_bar - g_i))   -> ``GradientAlignment(mode="displacement")``
    MAML replay on pool episodes                                           -> ``_replay`` (``core.maml.maml_query``)

Release behaviour as flags: ``release_kl`` (probabilities passed to ``kl_div`` in the KD term),
``slice_first`` (the multi-domain / multi-architecture branches cluster only the first 100 models),
``fisher: batch`` is the release's estimator (``per_sample`` is Task2Vec's). Model selection on meta-val.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.func import functional_call

from core.conv4 import Conv4
from core.dfml_losses import distill, inversion_loss
from core.episodic_evaluation import EpisodicEvaluation
from core.gradient_alignment import mean_gradient
from core.maml import maml_query, transductive
from core.model_zoo import distilled_shape, load_zoo
from core.rng import keyed_generator
from core.run_dir import run_directory
from core.task_pool import TaskPool
from core.task_similarity import group_models, mean_within_group
from core.teacher_inversion import fresh_generator, invert
from core.tensor_augment import random_crop_flip
from lit_modules.tgr_parts import zoo_similarity


class TGRModule(EpisodicEvaluation, L.LightningModule):
    """Data-free meta-learning from a heterogeneous zoo by task groupings and gradient regularisation.

    Args:
        zoo: manifest (or folder) of the teacher zoo (``lit_modules.model_zoo.ZooModule``, or combined zoos).
        hidden: channels of the Conv4 meta-learner (release 32).
        nz: generator latent size (release 256).
        ngf: generator width (release 64).
        n_groups: task groups (release 5).
        grouping: ``heterogeneous`` (cluster on D = 1 - S, the paper), ``homogeneous`` (cluster on S) or
            ``random`` (a seeded random split): the ablations.
        group_seed: ``random_state`` of the spectral clustering (release 42).
        slice_first: cluster only the first this many teachers (the release's multi-domain/-architecture
            ``[:pre_model_num]`` slicing, 100); 0: all teachers (default).
        teachers_per_step: teachers drawn (with replacement) from the step's group (release 4).
        images_per_class: recovered images per class per teacher and step (release 30).
        inversion_steps: Adam steps of each fresh generator (release 200).
        inversion_lr: generator and latent learning rate (release 1e-3, betas 0.5/0.999).
        ce_weight: teacher CE weight of the inversion loss (release ``oh`` 1).
        bn_weight: BatchNorm-statistics weight of the inversion loss (release ``bn`` 1).
        augment_padding: random-crop padding of the augmentation (release 4).
        augment_flip: horizontal flips (release on; off for characters).
        gt_weight: weight of the CE to the pseudo-labels beside KD (release ``gt_loss_weight`` 1).
        release_kl: probabilities passed to ``kl_div`` in the KD term (release).
        outer_lr: Adam learning rate of the meta-learner, shared by the group step and replay (release 1e-3).
        replay_n_way: classes of replay episodes (the teachers' class count).
        replay_k_shot: support images per class of replay episodes.
        replay_q_query: query images per class of replay episodes (release 15).
        inner_steps: MAML inner SGD steps in replay (release 5).
        inner_lr: MAML inner learning rate (release 0.01).
        first_order: first-order MAML in replay (default second order).
        episode_batch: episodes per replay meta-update (release 16).
        replay_batches: most replay meta-updates per step.
        replay_patience: stop replay after this many meta-updates without better query accuracy (release 4;
            one host read per meta-update); 0 runs all ``replay_batches``.
        pool_capacity: images kept per class in the pool (release 20 writes x 30).
        probe: ``conv4`` (a Conv4 trained on the datamodule's probe classes) or a path to torchvision
            ResNet-34 ImageNet weights (``.pth`` state dict, the paper's probe; loaded weights-only).
        probe_hidden: channels of the ``conv4`` probe.
        probe_epochs: training epochs of the ``conv4`` probe.
        fisher: ``batch`` (release: batch-level empirical Fisher, the probe's own head) or ``per_sample``
            (Task2Vec: per-example Fisher with a fitted head).
        embedding_images_per_class: recovered images per class for the embedding (release 20 x 30 = 600).
        embedding_steps: inversion steps per embedding batch (release 200 x 20 rounds).
        embedding_cache: folder of the per-teacher embedding cache (keyed by teacher hash, probe and
            settings); default ``<litzoo cache>/tgr_embeddings``; ``""`` disables it.
        evaluation: ``maml`` (fine-tune ``test_steps`` steps, the protocol) or ``protonet``.
        test_steps: MAML fine-tuning steps at evaluation (release 10).
        test_lr: fine-tuning learning rate at evaluation (release 0.01).
        cosine_every: steps between measurements of the mean pairwise gradient cosine of the step's teachers
            (a diagnostic for the heterogeneity picture, one extra backward per teacher); 0: off.
        rng_seed: seed of group and teacher draws, latents, generators, augmentation and replay (keyed by step).
    """

    def __init__(self, zoo: str = "runs/tgr/demo/zoo", hidden: int = 32, nz: int = 256, ngf: int = 64,
                 n_groups: int = 5, grouping: Literal["heterogeneous", "homogeneous", "random"] = "heterogeneous",
                 group_seed: int = 42, slice_first: int = 0, teachers_per_step: int = 4, images_per_class: int = 30,
                 inversion_steps: int = 200, inversion_lr: float = 1e-3, ce_weight: float = 1.0,
                 bn_weight: float = 1.0, augment_padding: int = 4, augment_flip: bool = True, gt_weight: float = 1.0,
                 release_kl: bool = False, outer_lr: float = 1e-3, replay_n_way: int = 5, replay_k_shot: int = 5,
                 replay_q_query: int = 15, inner_steps: int = 5, inner_lr: float = 0.01, first_order: bool = False,
                 episode_batch: int = 16, replay_batches: int = 10, replay_patience: int = 4,
                 pool_capacity: int = 600, probe: str = "conv4", probe_hidden: int = 32, probe_epochs: int = 10,
                 fisher: Literal["batch", "per_sample"] = "batch", embedding_images_per_class: int = 120,
                 embedding_steps: int = 200, embedding_cache: str | None = None,
                 evaluation: Literal["maml", "protonet"] = "maml", test_steps: int = 10, test_lr: float = 0.01,
                 cosine_every: int = 0, rng_seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        if evaluation not in ("maml", "protonet"):
            raise ValueError(f"model.init_args.evaluation={evaluation!r}: use maml or protonet")
        if fisher not in ("batch", "per_sample"):
            raise ValueError(f"model.init_args.fisher={fisher!r}: use batch or per_sample")
        if grouping not in ("heterogeneous", "homogeneous", "random"):
            raise ValueError(f"model.init_args.grouping={grouping!r}: use heterogeneous, homogeneous or random")
        teachers, self.records, meta = load_zoo(zoo, key="model.init_args.zoo")
        n_models = min(slice_first, len(teachers)) if slice_first else len(teachers)
        if n_groups > n_models:
            raise ValueError(f"model.init_args.n_groups={n_groups} but the zoo gives {n_models} teachers to group: "
                             "lower n_groups or use a larger zoo")
        self.n_classes_teacher, self.channels, self.image_size = distilled_shape(self.records, replay_n_way)
        self.teachers = torch.nn.ModuleList(teachers)
        self.register_buffer("classes", torch.tensor([r.classes for r in self.records]), persistent=False)
        with torch.random.fork_rng(devices=[]):  # initial weights depend on rng_seed only
            torch.manual_seed(rng_seed)
            self.learner = transductive(Conv4(self.channels, hidden, replay_n_way, self.image_size))
        self.pool = TaskPool(meta.get("n_classes", int(self.classes.max()) + 1), pool_capacity)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self.groups: list[list[int]] | None = None  # fixed once, stored in checkpoints
        self.similarity: Tensor | None = None
        self.cosine_curve: list[tuple[int, float]] = []
        self.within_group_similarity = float("nan")
        self.init_selection()
        self.gradient_rule: Any = None

    def train(self, mode: bool = True) -> TGRModule:
        super().train(mode)
        self.teachers.eval()  # frozen classifiers: BatchNorm on running statistics (the inversion targets)
        return self

    # --- SupportsGradientAlignment ---------------------------------------------------------------
    def alignment_parameters(self) -> dict[str, Tensor]:
        return dict(self.learner.named_parameters())

    def set_gradient_rule(self, rule: Any) -> None:
        self.gradient_rule = rule

    # --- grouping (once) ---------------------------------------------------------------------------
    def _compute_groups(self) -> None:
        hp = self.hparams
        n_models = min(hp.slice_first, len(self.teachers)) if hp.slice_first else len(self.teachers)
        self.similarity = zoo_similarity(self, self.trainer.datamodule, n_models)
        self.groups = group_models(self.similarity, hp.n_groups, hp.grouping, hp.group_seed)

    def on_fit_start(self) -> None:
        if self.groups is None:  # a resumed run keeps its checkpoint's groups
            self._compute_groups()
        self.within_group_similarity = mean_within_group(self.similarity, self.groups)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.learner.parameters(), lr=self.hparams.outer_lr)

    # --- one step ----------------------------------------------------------------------------------
    def draw_teachers(self, step: int) -> tuple[int, list[int]]:
        """``(group, teacher ids)``: one group, then ``teachers_per_step`` of its members with replacement."""
        hp = self.hparams
        g = keyed_generator(hp.rng_seed, step, 0)
        group = int(torch.randint(len(self.groups), (1,), generator=g))
        members = torch.tensor(self.groups[group])
        return group, members[torch.randint(len(members), (hp.teachers_per_step,), generator=g)].tolist()

    def recover(self, teacher: int, n_per_class: int, steps: int, key: tuple[int, ...]) -> Tensor:
        """Images inverted from one teacher by a fresh generator (class ``i mod C`` at position i)."""
        hp = self.hparams
        n = self.n_classes_teacher * n_per_class
        targets = torch.arange(n, device=self.device) % self.n_classes_teacher
        gen = fresh_generator(hp.nz, hp.ngf, self.image_size, self.channels, keyed_generator(hp.rng_seed, *key, 0))
        gen = gen.to(self.device)
        z = torch.randn(n, hp.nz, generator=keyed_generator(hp.rng_seed, *key, 1)).to(self.device)
        aug = keyed_generator(hp.rng_seed, *key, 2)
        loss_fn = inversion_loss(self.teachers[teacher], targets,
                                 lambda x: random_crop_flip(x, hp.augment_padding, hp.augment_flip, aug),
                                 None, hp.ce_weight, 0.0, hp.bn_weight, hp.release_kl)
        images, _ = invert(gen, z, loss_fn, steps, hp.inversion_lr)
        return images

    def _task_loss_fn(self, step: int, recovered: list[tuple[int, Tensor]]) -> Any:
        hp = self.hparams
        xs = [random_crop_flip(x, hp.augment_padding, hp.augment_flip, keyed_generator(hp.rng_seed, step, 3, j))
              for j, (_, x) in enumerate(recovered)]
        with torch.no_grad():
            targets = [self.teachers[t](x) for (t, _), x in zip(recovered, xs)]
        labels = torch.arange(len(xs[0]), device=self.device) % self.n_classes_teacher

        def loss_fn(params: dict[str, Tensor], i: int) -> Tensor:
            logits = functional_call(self.learner, params, (xs[i],))
            return distill(logits, targets[i], hp.release_kl) + hp.gt_weight * torch.nn.functional.cross_entropy(
                logits, labels)

        return loss_fn

    def _align(self, step: int, recovered: list[tuple[int, Tensor]]) -> None:
        """One update of the learner from the group's teachers (the callback's rule; plain mean without it)."""
        loss_fn = self._task_loss_fn(step, recovered)
        params = self.alignment_parameters()
        if self.hparams.cosine_every and step % self.hparams.cosine_every == 0:
            self._log_gradient_cosine(step, loss_fn, params, len(recovered))
        grads = (self.gradient_rule or mean_gradient)(loss_fn, params, len(recovered))
        for name, p in self.learner.named_parameters():
            p.grad = grads[name]
        self.optimizers().step()

    def _log_gradient_cosine(self, step: int, loss_fn: Any, params: dict[str, Tensor], n: int) -> None:
        flat = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss_fn(params, i), list(params.values()))])
                            for i in range(n)])
        unit = torch.nn.functional.normalize(flat, dim=1)
        cos = unit @ unit.T
        value = (cos.sum() - cos.diagonal().sum()) / max(n * (n - 1), 1)
        self.cosine_curve.append((step, float(value)))  # diagnostic only, every cosine_every steps
        self.log("train/group_grad_cosine", value)

    def _replay(self, step: int) -> None:
        """MAML on pool episodes until ``replay_patience`` meta-updates bring no better query accuracy."""
        hp = self.hparams
        opt, best, waited = self.optimizers(), -1.0, 0
        for b in range(hp.replay_batches):
            support, query, _ = self.pool.sample(hp.replay_n_way, hp.replay_k_shot, hp.replay_q_query, hp.episode_batch,
                                                 keyed_generator(hp.rng_seed, step, 4, b))
            loss, acc = maml_query(self.learner, dict(self.learner.named_parameters()), support.to(self.device),
                                   query.to(self.device), hp.inner_steps, hp.inner_lr, hp.first_order)
            opt.zero_grad()
            self.manual_backward(loss.sum())  # the release sums the episodes' query losses
            opt.step()
            self.log("train/replay_loss", loss.mean().detach(), on_step=True)
            if hp.replay_patience:
                mean = float(acc.mean())  # data-dependent stopping rule: one host read per meta-update
                best, waited = (mean, 0) if mean > best else (best, waited + 1)
                if waited >= hp.replay_patience:
                    break

    def training_step(self, batch: int, batch_idx: int) -> None:
        hp = self.hparams
        step = int(self.step_count)
        group, ids = self.draw_teachers(step)
        recovered = [(t, self.recover(t, hp.images_per_class, hp.inversion_steps, (step, 5, j)))
                     for j, t in enumerate(ids)]
        for t, x in recovered:  # every sampled teacher's images enter the pool (FREE's write bug fixed)
            self.pool.add(x, self.classes[t][torch.arange(len(x), device=x.device) % self.n_classes_teacher])
        self._align(step, recovered)
        self._replay(step)
        self.log_dict({"train/group": float(group), "train/within_group_similarity": self.within_group_similarity})
        self.step_count += 1

    # --- pictures, evaluation, state -----------------------------------------------------------------
    def on_train_end(self) -> None:
        from core.heterogeneity_figure import heterogeneity_figure

        folder = run_directory(self.trainer)
        if not self.trainer.is_global_zero or self.groups is None:
            return
        png = heterogeneity_figure(self.similarity, self.groups, {self.hparams.grouping: self.cosine_curve},
                                   folder / "heterogeneity.png")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="heterogeneity", images=[str(png)], step=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tgr"] = {"pool": self.pool.state_dict(), **self.selection_state(),
                             "groups": self.groups, "similarity": self.similarity, "cosine_curve": self.cosine_curve}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["tgr"]
        self.pool.load_state_dict(state["pool"])
        self.load_selection_state(state)
        self.groups, self.similarity, self.cosine_curve = state["groups"], state["similarity"], state["cosine_curve"]
