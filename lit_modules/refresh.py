"""ContinualModule: the unified continual-learning objective of Wang et al., one module for ER, DER, DER++, EWC.

Wang, Li, Shen, Huang, "A Unified and General Framework for Continual Learning" (ICLR 2024,
arXiv:2403.13249). Section 3 writes many continual learners as one objective on the current batch,

    L_CL(theta) = L_CE(x, y) + alpha * D_Phi(h_theta(x_mem), z) + beta * D_Psi(theta, theta_old)      (Eq. 1)

with Bregman divergences in output space (D_Phi) and weight space (D_Psi). Phi = negative entropy with a
one-hot target z gives cross-entropy on replayed labels (ER); Phi = squared norm with stored logits z
gives their mean squared error (DER); both together are DER++; Psi = 1/2 theta^T Omega theta gives the
EWC penalty 1/2 (theta - theta_old)^T Omega (theta - theta_old) with a diagonal importance Omega (the
Fisher for EWC, identity for an L2 anchor; online EWC decays it by ``ewc_gamma`` at each task end).
Here ``alpha`` weights the logit term and ``beta`` the label term, as in DER++'s code; ``ewc_lambda``
weights the weight-space term. Replay follows mammoth: a reservoir buffer of non-augmented inputs, the
labels and the logits produced at insertion; two independent buffer batches for the two output terms.

The stream is served by a ``core.protocols.TaskStream`` datamodule (task switches inside one fit).
After every task all tasks are evaluated, class-IL (argmax over the single head) and task-IL (argmax over
the task's own classes) from the same forward pass, filling accuracy matrices; the final average
accuracy, forgetting, BWT and FWT follow mammoth's formulas (``core.continual_metrics``). The refresh
plug-in (``callbacks.refresh.RefreshLearning``) works through ``core.protocols.SupportsRefresh``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor

from core.buffer import ReservoirBuffer
from core.continual_metrics import save_accuracy_heatmap, stream_metrics
from core.fisher import FisherVariant, dataset_fisher
from core.protocols import TaskStream, require_protocol
from core.rng import keyed_generator
from core.run_dir import run_directory
from core.tensor_augment import random_crop_flip
from lit_modules.refresh_parts import build_backbone

MODES = ("class_il", "task_il")
AUGMENT_KEY, REPLAY_KEY = 1, 2  # roles of the keyed generators


class ContinualModule(L.LightningModule):
    """Current-task cross-entropy + output-space replay terms + a weight-space quadratic term (Eq. 1).

    SGD: ``alpha = beta = ewc_lambda = 0``; ER: ``beta > 0``; DER: ``alpha > 0``; DER++: both; (online) EWC:
    ``ewc_lambda > 0``. Any combination is allowed.

    Args:
        backbone: ``resnet18`` (mammoth's, width ``width``), ``cnn`` (small, with BatchNorm) or ``mlp``.
        num_classes: outputs of the single head: all classes of the stream.
        width: nf of the ResNet-18 (64 in the released code), first conv width of the CNN, MLP hidden size.
        in_channels: image channels.
        image_size: image side (used by the MLP).
        lr: SGD learning rate.
        momentum: SGD momentum (0 in mammoth).
        weight_decay: SGD weight decay (the released DER++ uses 1e-4 on Seq-CIFAR-10 and Seq-TinyImageNet).
        lr_milestones: epochs within each task at which the learning rate is multiplied by ``lr_gamma``
            (restarting every task, as mammoth's Seq-CIFAR-100 scheduler); None: constant.
        lr_gamma: learning-rate factor at each milestone.
        alpha: weight of the MSE between replayed logits and the logits stored at insertion (DER).
        beta: weight of the cross-entropy on replayed labels (ER).
        buffer_size: reservoir capacity (the paper's memory size, e.g. 500); 0: no replay.
        minibatch_size: size of each replayed batch.
        ewc_lambda: weight of the quadratic weight-space term 1/2 sum Omega (theta - theta_old)^2
            (mammoth's ``e_lambda`` penalty has no 1/2: ``e_lambda = ewc_lambda / 2``).
        ewc_importance: Omega: ``fisher`` (EWC) or ``uniform`` (identity: an L2 anchor to the last task's weights).
        ewc_gamma: online-EWC decay: Omega <- ewc_gamma * Omega + F_task at every task end.
        fisher_variant: Fisher estimator of the EWC importance (``mammoth``, ``empirical``, ``exact``).
        crop_padding: train-time random crop padding (pixels) of stream and replayed inputs (4 for CIFAR).
        flip: random horizontal flips at train time (CIFAR, Tiny ImageNet; not digits).
        class_il_scope: class-IL prediction over ``all`` outputs (the released code) or only the classes
            ``seen`` so far (modern mammoth).
        seed: seed of augmentation and replay sampling (keyed by step and rank) and of reservoir insertion
            (keyed by the number of examples seen).
        plot: draw the accuracy matrices as PNGs in the run directory after every task.
    """

    def __init__(
        self,
        backbone: Literal["resnet18", "cnn", "mlp"] = "cnn",
        num_classes: int = 10,
        width: int = 32,
        in_channels: int = 1,
        image_size: int = 28,
        lr: float = 0.03,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        lr_milestones: list[int] | None = None,
        lr_gamma: float = 0.1,
        alpha: float = 0.0,
        beta: float = 0.0,
        buffer_size: int = 0,
        minibatch_size: int = 32,
        ewc_lambda: float = 0.0,
        ewc_importance: Literal["fisher", "uniform"] = "fisher",
        ewc_gamma: float = 1.0,
        fisher_variant: FisherVariant = "mammoth",
        crop_padding: int = 0,
        flip: bool = False,
        class_il_scope: Literal["all", "seen"] = "all",
        seed: int = 0,
        plot: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if min(alpha, beta, ewc_lambda, lr) < 0:
            raise ValueError("model.init_args alpha, beta, ewc_lambda and lr must be >= 0")
        if (alpha > 0 or beta > 0) and buffer_size < 1:
            raise ValueError(
                f"replay (alpha={alpha}, beta={beta}) needs a memory: set model.init_args.buffer_size >= 1 "
                "(or alpha = beta = 0 for a method without replay)"
            )
        if (alpha > 0 or beta > 0) and minibatch_size < 1:  # an empty replay batch makes the loss NaN
            raise ValueError(f"replay needs model.init_args.minibatch_size >= 1, got {minibatch_size}")
        self.net = build_backbone(backbone, num_classes, width, in_channels, image_size)
        self.buffer = ReservoirBuffer(buffer_size, seed) if buffer_size > 0 else None
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.importance: dict[str, Tensor] = {}  # Omega of the weight-space term
        self.anchor: dict[str, Tensor] = {}  # theta_old
        self.ewc_tasks_done = 0  # finished tasks whose Fisher is in ``importance`` (the update is idempotent)
        self.results: dict[str, Any] = {}  # accuracy matrices and summaries (also in checkpoints)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    # ------------------------------------------------------------------ stream
    def setup(self, stage: str) -> None:
        stream = self.trainer.datamodule
        require_protocol(stream, TaskStream, "lit_modules.refresh.ContinualModule (data must be a task stream)")
        self.task_classes = stream.task_classes()
        if self.trainer.accumulate_grad_batches > 1:  # random draws are keyed by the optimizer step
            raise ValueError(f"trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches}: continual "
                             "learners key augmentation and replay draws by the optimizer step; use 1 and raise "
                             "data.init_args.batch_size instead")
        total = sum(len(c) for c in self.task_classes)
        if total != self.hparams.num_classes:
            raise ValueError(f"model.init_args.num_classes={self.hparams.num_classes} but the stream has {total} classes")
        if not self.results:
            tasks = len(self.task_classes)
            nan = torch.full((len(MODES), tasks, tasks), float("nan"))
            self.results = {"matrix": nan, "random": torch.full((len(MODES), tasks), float("nan")), "summary": {}}

    def _stream(self) -> TaskStream:
        return self.trainer.datamodule

    def _augment(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return random_crop_flip(images, self.hparams.crop_padding, self.hparams.flip, generator)

    def _train_view(self, images: Tensor) -> Tensor:
        # Keyed by the step: the unlearning pass of refresh and the learning step see the same view.
        return self._augment(images, keyed_generator(self.hparams.seed, AUGMENT_KEY, self.global_step, self.global_rank))

    # ------------------------------------------------------------------ objective (Eq. 1)
    def weight_penalty(self) -> Tensor:
        """1/2 sum Omega (theta - theta_old)^2 over the anchored parameters (D_Psi of Eq. 1)."""
        terms = [(self.importance[n] * (p - self.anchor[n]).square()).sum()
                 for n, p in self.net.named_parameters() if n in self.anchor]
        return 0.5 * torch.stack(terms).sum()

    def objective(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The training loss of a batch: ``(loss, stream logits, parts)``. Draws replay batches from a
        generator keyed by (seed, step, rank), so calling it twice in a step replays the same examples."""
        hp = self.hparams
        logits = self.net(self._train_view(batch["image"]))
        parts = {"ce": F.cross_entropy(logits, batch["label"])}  # L_CE on the current task
        loss = parts["ce"]
        if self.buffer is not None and not self.buffer.is_empty():
            gen = keyed_generator(hp.seed, REPLAY_KEY, self.global_step, self.global_rank)
            if hp.alpha > 0:  # D_Phi with Phi = squared norm, z = stored logits (DER)
                memory = self.buffer.sample(hp.minibatch_size, gen)
                parts["der"] = F.mse_loss(self.net(self._augment(memory["examples"], gen)), memory["logits"])
                loss = loss + hp.alpha * parts["der"]
            if hp.beta > 0:  # D_Phi with Phi = negative entropy, z = one-hot stored label (ER)
                memory = self.buffer.sample(hp.minibatch_size, gen)
                parts["er"] = F.cross_entropy(self.net(self._augment(memory["examples"], gen)), memory["labels"])
                loss = loss + hp.beta * parts["er"]
        if hp.ewc_lambda > 0 and self.anchor:  # D_Psi with Psi = 1/2 theta^T Omega theta
            parts["ewc"] = self.weight_penalty()
            loss = loss + hp.ewc_lambda * parts["ewc"]
        return loss, logits, parts

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, logits, parts = self.objective(batch)
        if self.buffer is not None:
            columns = (batch["image"], batch["label"], logits.detach(), batch["task"])
            if self.trainer.world_size > 1:  # identical buffers on every rank (see core.buffer)
                columns = tuple(self.all_gather(c).flatten(0, 1) for c in columns)
            self.buffer.add(*columns)
        self.train_acc(logits, batch["label"])
        if self.global_step % self.trainer.log_every_n_steps:  # the logger would drop them: skip the cost
            return loss
        self.log_dict({"train/loss": loss, **{f"train/loss_{k}": v for k, v in parts.items()}}, batch_size=len(logits))
        self.log("train/acc", self.train_acc, prog_bar=True, batch_size=len(logits))
        return loss

    # ------------------------------------------------------------------ SupportsRefresh
    def refresh_network(self) -> torch.nn.Module:
        return self.net

    def refresh_loss(self, batch: dict[str, Tensor], objective: bool) -> Tensor:
        if objective:
            return self.objective(batch)[0]
        return F.cross_entropy(self.net(self._train_view(batch["image"])), batch["label"])

    def fisher_examples(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return batch["image"], batch["label"]

    # ------------------------------------------------------------------ task ends
    def on_train_epoch_start(self) -> None:
        """The weight-space term of the finished task, at the start of the next one: the weights are still
        those of the task's end, and ``ewc_tasks_done`` makes the update happen once whatever checkpoint
        (validation end, epoch end, mid-epoch) the run resumed from."""
        task = self._stream().task_of_epoch(self.current_epoch)
        if not (self.hparams.ewc_lambda > 0 and self.ewc_tasks_done < task):
            return
        hp, finished = self.hparams, task - 1
        if hp.ewc_importance == "fisher":
            fisher = dataset_fisher(
                self.net, self._stream().train_set(finished), self.fisher_examples,
                lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"), variant=hp.fisher_variant,
                rank=self.global_rank, world_size=self.trainer.world_size)
        else:
            fisher = {n: torch.ones_like(p) for n, p in self.net.named_parameters()}
        for name, value in fisher.items():  # online EWC: Omega <- gamma Omega + F
            self.importance[name] = hp.ewc_gamma * self.importance.get(name, 0.0) + value
        self.anchor = {n: p.detach().clone() for n, p in self.net.named_parameters()}
        self.ewc_tasks_done = task

    # ------------------------------------------------------------------ evaluation
    def _count(self, logits: Tensor, labels: Tensor, task: int) -> Tensor:
        """Correct class-IL and task-IL predictions of a batch of task ``task``."""
        seen = sum(len(c) for c in self.task_classes[: self._stream().task_of_epoch(self.current_epoch) + 1])
        pool = logits if self.hparams.class_il_scope == "all" else logits[:, :seen]
        classes = torch.tensor(self.task_classes[task], device=logits.device)
        task_pred = classes[logits[:, classes].argmax(1)]  # task-IL: other tasks' outputs masked out
        return torch.stack([(pool.argmax(1) == labels).sum(), (task_pred == labels).sum()])

    def on_validation_epoch_start(self) -> None:
        tasks = len(self.task_classes)
        self._correct = torch.zeros(len(MODES), tasks, device=self.device)
        self._seen = torch.zeros(tasks, device=self.device)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._correct[:, dataloader_idx] += self._count(self.net(batch["image"]), batch["label"], dataloader_idx)
        self._seen[dataloader_idx] += len(batch["label"])

    @torch.no_grad()
    def on_train_start(self) -> None:
        self.importance = {n: v.to(self.device) for n, v in self.importance.items()}  # restored on the CPU
        self.anchor = {n: v.to(self.device) for n, v in self.anchor.items()}
        # Accuracy of the randomly initialised network, the reference of forward transfer (FWT).
        if self.global_step > 0 or not torch.isnan(self.results["random"]).all():
            return
        was_training = self.net.training
        self.net.eval()
        self.on_validation_epoch_start()
        for task, loader in enumerate(self._stream().val_dataloader()):
            for batch in loader:
                self.validation_step({k: v.to(self.device) for k, v in batch.items()}, 0, task)
        self.results["random"] = (self._correct / self._seen.clamp(min=1)).cpu()
        self.net.train(was_training)

    def _reduced_accuracy(self) -> Tensor:
        correct = self.trainer.strategy.reduce(self._correct, reduce_op="sum")
        seen = self.trainer.strategy.reduce(self._seen, reduce_op="sum")
        return (correct / seen.clamp(min=1)).cpu()

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        """``train.py test``: accuracy on every task's test split, and their mean (the final average accuracy)."""
        acc = self._reduced_accuracy()
        for m, mode in enumerate(MODES):
            self.log(f"test/final_avg_acc_{mode}", acc[m].mean().item())
            self.log_dict({f"test/acc_{mode}_task{t}": a.item() for t, a in enumerate(acc[m])})

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        acc = self._reduced_accuracy()
        stream, epoch = self._stream(), self.current_epoch
        task = stream.task_of_epoch(epoch)
        for m, mode in enumerate(MODES):
            self.log(f"val/acc_{mode}", acc[m, : task + 1].mean().item(), prog_bar=True)
        if stream.is_task_end(epoch):
            self.results["matrix"][:, task] = acc
            self._summarise(task)

    def _summarise(self, task: int) -> None:
        """Metrics of the finished tasks 0..task; heatmaps (and W&B tables) of the accuracy matrices."""
        summary: dict[str, float] = {"tasks_done": float(task + 1)}
        out = run_directory(self.trainer)  # a collective call: every rank
        for m, mode in enumerate(MODES):
            matrix = self.results["matrix"][m, : task + 1, : task + 1]
            metrics = stream_metrics(matrix, self.results["random"][m, : task + 1])
            summary.update({f"{name}_{mode}": value for name, value in metrics.items()})
            if self.global_rank == 0 and self.hparams.plot:
                self._draw(out, mode, self.results["matrix"][m, : task + 1])
        self.results["summary"] = summary
        self.log_dict({f"val/{k}": v for k, v in summary.items()})

    def _draw(self, out: Path, mode: str, rows: Tensor) -> None:
        square = torch.cat([rows, torch.full((rows.shape[1] - rows.shape[0], rows.shape[1]), float("nan"))])
        png = save_accuracy_heatmap(square, out / f"acc_matrix_{mode}.png", f"{mode} accuracy (row t: after task t)")
        columns = ["after_task"] + [f"task_{i}" for i in range(rows.shape[1])]
        data = [[t, *row.tolist()] for t, row in enumerate(rows)]
        for logger in self.loggers:
            if hasattr(logger, "log_table"):  # W&B
                logger.log_table(key=f"val/acc_matrix_{mode}", columns=columns, data=data)
                logger.log_image(key=f"val/acc_heatmap_{mode}", images=[str(png)])

    # ------------------------------------------------------------------ optimisation and checkpoints
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if not hp.lr_milestones:
            return opt
        stream, milestones = self._stream(), sorted(hp.lr_milestones)

        def factor(epoch: int) -> float:  # milestones count from the first epoch of the current task
            task = stream.task_of_epoch(epoch)
            start = next(e for e in range(epoch + 1) if stream.task_of_epoch(e) == task)
            return hp.lr_gamma ** sum(m <= epoch - start for m in milestones)

        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["continual"] = {"results": self.results, "importance": self.importance, "anchor": self.anchor,
                                   "ewc_tasks_done": self.ewc_tasks_done}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["continual"]
        self.results, self.importance, self.anchor = state["results"], state["importance"], state["anchor"]
        self.ewc_tasks_done = int(state["ewc_tasks_done"])
