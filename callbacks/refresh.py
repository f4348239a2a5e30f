"""Refresh learning: unlearn the current batch, then learn it (Wang et al., ICLR 2024), as a plug-in.

Wang, Li, Shen, Huang, "A Unified and General Framework for Continual Learning" (ICLR 2024,
arXiv:2403.13249), Section 4 / Algorithm 1. Before every learning step the weights first move *up* the
loss of the current batch, preconditioned by the inverse Fisher of the previous tasks (weights important
to old tasks move less) and with Gaussian noise; the ordinary step of the base method then runs at the
perturbed weights (no restore). Section 5 shows this approximately adds an inverse-Fisher-weighted
gradient-norm penalty, i.e. a preference for flat minima.

Paper (Algorithm 1, derived from a Fokker-Planck gradient flow with D = F^-1):
    theta <- theta + gamma F^-1 grad L_CL(theta) + N(0, 2 gamma F^-1)                          (Eq. 14)
Released code (joey-wang123/CL-refresh-learning, models/derpp.py), per parameter tensor l:
    u_l = ||theta_l|| / ||g_l|| * g_l,  g = grad CE(current batch)
    theta_l <- theta_l + delta (u_l + 0.001 xi_l) / (1 + 0.001 F_l),  xi ~ N(0, I),  delta = 1e-5
    F <- tau F + F_task at each task end (mammoth's p-weighted true-label Fisher), tau = 1e-5.

Flags (defaults = the released code): ``unlearn_loss`` ce | objective, ``normalize`` (per-tensor
rescaling), ``preconditioner`` damped (1 + lambda F)^-1 | inverse (F + lambda)^-1, ``noise`` scaled
(delta * noise_scale * P xi) | langevin (noise_scale * sqrt(2 delta P) xi), ``fisher_variant``,
``fisher_bn``, ``fisher_decay`` and ``fisher_update`` (task | epoch | never). ``direction=random`` is the
control arm: each tensor moves by a random Gaussian direction with the norm of its refresh move, which
separates "refresh helps" from "any perturbation of that size helps". The paper's variant:
``unlearn_loss=objective, normalize=false, preconditioner=inverse, noise=langevin, noise_scale=1``
(configs/refresh/refresh_paper.yaml).

Mechanics: the unlearning gradient is taken with ``torch.autograd.grad`` (``.grad`` untouched), the
BatchNorm running statistics of the module are restored after the unlearning forward, the noise comes
from generators keyed by (seed, step) on the parameters' device (the global RNG is never used), and under
DDP the unlearning gradient is averaged over ranks so that every rank applies the same update. With
``delta = 0`` training is bit-identical to the base method. The Fisher of a finished task is estimated at
the start of the next task (the weights are still the task's end weights) and counted in
``fisher_done``, so the update happens exactly once whatever checkpoint a run resumes from; F and the
counter are the callback's state (checkpoints). Randomness is keyed by the optimizer step, so gradient
accumulation is refused. ``track_moves`` records, per step, the ratio of the unlearning move to the
SGD move (lr x gradient norm) and, per Fisher update, the preconditioner's range (benchmarks). The module side is ``core.protocols.SupportsRefresh``.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from core.fisher import FisherVariant, dataset_fisher
from core.protocols import SupportsRefresh, TaskStream, require_protocol
from core.rng import keyed_generator

NOISE_KEY, CONTROL_KEY = 3, 4


def unlearning_displacement(
    param: Tensor, grad: Tensor, fisher: Tensor | None, noise: Tensor, *, delta: float, normalize: bool,
    preconditioner: str, damping: float, noise_mode: str, noise_scale: float,
) -> Tensor:
    """The move of one parameter tensor in an unlearning step (ascent direction, preconditioned, noisy)."""
    fisher = param.new_zeros(()) if fisher is None else fisher  # no Fisher yet (first task): F = 0, broadcast
    precond = 1.0 / (1.0 + damping * fisher) if preconditioner == "damped" else 1.0 / (fisher + damping)
    direction = grad * (param.norm() / (grad.norm() + 1e-20)) if normalize else grad
    if noise_mode == "scaled":  # released code: delta (u + 0.001 xi) / (1 + 0.001 F)
        return delta * (direction + noise_scale * noise) * precond
    return delta * direction * precond + noise_scale * (2.0 * delta * precond).sqrt() * noise  # Eq. (14)


class RefreshLearning(L.Callback):
    """Unlearn each training batch (Fisher-preconditioned noisy ascent) before the module learns it.

    Args:
        delta: unlearning size (delta of the released code, gamma of the paper); 0 disables the move.
        steps: unlearning steps per batch (J of Algorithm 1; 1 in the released code).
        every_n_steps: unlearn before every n-th optimizer step only.
        unlearn_loss: ``ce`` on the current batch (released code) or the module's whole ``objective`` (paper).
        normalize: rescale each tensor's ascent direction to the norm of the tensor itself (released code).
        preconditioner: ``damped`` (1 + damping F)^-1 (released code) or ``inverse`` (F + damping)^-1 (paper).
        damping: lambda of the preconditioner (1e-3 in the released code).
        noise: ``scaled`` delta * noise_scale * P xi (released code) or ``langevin`` noise_scale * sqrt(2 delta P) xi.
        noise_scale: noise factor (1e-3 in the released code; 1 is the paper's Langevin noise).
        fisher_variant: ``mammoth`` (released code), ``empirical`` or ``exact`` (see core.fisher).
        fisher_bn: BatchNorm during the Fisher pass: ``train`` (per-example statistics, released code) or ``eval``.
        fisher_decay: tau of F <- tau F + F_new (1e-5 in the released code: F is the last task's Fisher).
        fisher_update: when F is re-estimated on the current training set: at each ``task`` end (released
            code; needs a TaskStream datamodule), each ``epoch`` end, or ``never`` (F = 0: no preconditioning).
        fisher_examples: examples of the training set used per estimate (seeded subset); None: all.
        direction: ``gradient`` (refresh) or ``random`` (control: a Gaussian direction per tensor rescaled to
            the norm of that tensor's refresh move).
        track_moves: record the unlearning/SGD move ratios and the preconditioner ranges (``moves``).
        seed: seed of the noise.
    """

    def __init__(
        self,
        delta: float = 1e-5,
        steps: int = 1,
        every_n_steps: int = 1,
        unlearn_loss: Literal["ce", "objective"] = "ce",
        normalize: bool = True,
        preconditioner: Literal["damped", "inverse"] = "damped",
        damping: float = 1e-3,
        noise: Literal["scaled", "langevin"] = "scaled",
        noise_scale: float = 1e-3,
        fisher_variant: FisherVariant = "mammoth",
        fisher_bn: Literal["train", "eval"] = "train",
        fisher_decay: float = 1e-5,
        fisher_update: Literal["task", "epoch", "never"] = "task",
        fisher_examples: int | None = None,
        direction: Literal["gradient", "random"] = "gradient",
        track_moves: bool = False,
        seed: int = 0,
    ) -> None:
        wanted = {"delta >= 0": delta >= 0, "steps >= 1": steps >= 1, "every_n_steps >= 1": every_n_steps >= 1,
                  "damping > 0": damping > 0, "noise_scale >= 0": noise_scale >= 0,
                  "fisher_examples >= 1 (or null: all)": fisher_examples is None or fisher_examples >= 1}
        failed = [rule for rule, ok in wanted.items() if not ok]
        if failed:
            raise ValueError(f"trainer.callbacks RefreshLearning init_args: needs {', '.join(failed)}; got delta={delta}, "
                             f"steps={steps}, every_n_steps={every_n_steps}, damping={damping}, "
                             f"noise_scale={noise_scale}, fisher_examples={fisher_examples}")
        self.delta, self.steps, self.every_n_steps, self.seed = delta, steps, every_n_steps, seed
        self.unlearn_loss, self.normalize, self.preconditioner = unlearn_loss, normalize, preconditioner
        self.damping, self.noise, self.noise_scale = damping, noise, noise_scale
        self.fisher_variant, self.fisher_bn, self.fisher_decay = fisher_variant, fisher_bn, fisher_decay
        self.fisher_update, self.fisher_examples = fisher_update, fisher_examples
        self.direction, self.track_moves = direction, track_moves
        self.fisher: dict[str, Tensor] = {}
        self.fisher_done = 0  # finished tasks (epochs with fisher_update=epoch) whose Fisher is in F
        # track_moves: per step (task, unlearning move / SGD move) and per Fisher update (task, min, max of P)
        self.moves: dict[str, list] = {"ratio": [], "preconditioner": []}
        self._unlearn_norm: Tensor | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_protocol(pl_module, SupportsRefresh, type(self).__name__)
        if self.fisher_update != "never":
            require_protocol(trainer.datamodule, TaskStream, f"{type(self).__name__}(fisher_update='{self.fisher_update}')")
        if trainer.accumulate_grad_batches > 1:
            raise ValueError(f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}: refresh keys its noise "
                             "by the optimizer step and unlearns once per step; use 1 (raise the batch size instead)")
        if str(trainer.precision) in ("bf16-true", "16-true"):
            raise ValueError("refresh moves weights by ~1e-5 of their norm, below half-precision resolution: "
                             "set trainer.precision to 32-true or a *-mixed precision")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        net = pl_module.refresh_network()
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        norms = [m for m in net.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
        for step in range(self.steps):
            with torch.enable_grad():
                loss = pl_module.refresh_loss(batch, objective=self.unlearn_loss == "objective")
                grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, grads)]
            if trainer.world_size > 1:  # one update on every rank: average the ranks' batch gradients
                flat = trainer.strategy.reduce(torch.cat([g.flatten() for g in grads]), reduce_op="mean")
                grads = list(flat.split([g.numel() for g in grads]))
            self._move(named, grads, trainer.global_step, step)
        for m, (mean, var, count) in zip(norms, saved):  # the unlearning forward must not shift BN statistics
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
        pl_module.log("train/refresh_loss", loss.detach(), on_step=True, on_epoch=False)

    @torch.no_grad()
    def _move(self, named: list[tuple[str, Tensor]], grads: list[Tensor], global_step: int, step: int) -> None:
        device, dtype = named[0][1].device, named[0][1].dtype
        sizes = [p.numel() for _, p in named]

        def draw(key: int) -> list[Tensor]:  # one draw for all tensors (cheaper than a call per tensor)
            gen = keyed_generator(self.seed, key, global_step, step, device=device)
            return list(torch.randn(sum(sizes), generator=gen, device=device, dtype=dtype).split(sizes))

        noises = draw(NOISE_KEY)
        randoms = draw(CONTROL_KEY) if self.direction == "random" else noises
        squares = []
        for (name, param), grad, noise, random in zip(named, grads, noises, randoms):
            fisher = self.fisher.get(name)
            if fisher is not None and fisher.device != device:
                fisher = self.fisher[name] = fisher.to(device)
            move = unlearning_displacement(
                param, grad.view_as(param), fisher, noise.view_as(param), delta=self.delta, normalize=self.normalize,
                preconditioner=self.preconditioner, damping=self.damping, noise_mode=self.noise,
                noise_scale=self.noise_scale)
            if self.direction == "random":  # control arm: same per-tensor norm, direction unrelated to the loss
                move = random.view_as(param) * (move.norm() / (random.norm() + 1e-20))
            param.add_(move)
            squares.append(move.square().sum())
        if self.track_moves:
            norm = torch.stack(squares).sum().sqrt()
            self._unlearn_norm = norm if self._unlearn_norm is None else self._unlearn_norm + norm

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        if self._unlearn_norm is None:  # not tracking, or no unlearning before this step
            return
        grads = [p.grad.square().sum() * group["lr"] ** 2 for group in optimizer.param_groups
                 for p in group["params"] if p.grad is not None]
        sgd_move = torch.stack(grads).sum().sqrt()  # plain SGD's move (momentum and weight decay left out)
        task = trainer.datamodule.task_of_epoch(trainer.current_epoch)
        self.moves["ratio"].append((task, self._unlearn_norm / sgd_move))
        self._unlearn_norm = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.fisher_update == "never":
            return
        epoch, stream = trainer.current_epoch, trainer.datamodule
        due = stream.task_of_epoch(epoch) if self.fisher_update == "task" else epoch
        if self.fisher_done < due:  # the previous task (epoch) ended: the weights are still its end weights
            self.update_fisher(trainer, pl_module, stream.train_set(stream.task_of_epoch(epoch - 1)))
            self.fisher_done = due

    def update_fisher(self, trainer: L.Trainer, pl_module: Any, dataset: Any) -> None:
        """F <- tau F + F_new, F_new estimated on ``dataset`` (all ranks get the same F)."""
        fresh = dataset_fisher(
            pl_module.refresh_network(), dataset, pl_module.fisher_examples,
            lambda t: trainer.strategy.reduce(t, reduce_op="sum"), variant=self.fisher_variant,
            bn_mode=self.fisher_bn, rank=trainer.global_rank, world_size=trainer.world_size,
            max_examples=self.fisher_examples, seed=self.seed + self.fisher_done)
        for name, value in fresh.items():
            old = self.fisher.get(name)
            self.fisher[name] = value if old is None else self.fisher_decay * old.to(value.device) + value
        if self.track_moves:  # one host sync per Fisher update
            precond = torch.cat([(1.0 / (1.0 + self.damping * f) if self.preconditioner == "damped"
                                  else 1.0 / (f + self.damping)).flatten() for f in self.fisher.values()])
            self.moves["preconditioner"].append((self.fisher_done, precond.min().item(), precond.max().item()))

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": {n: f.cpu() for n, f in self.fisher.items()}, "fisher_done": self.fisher_done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fisher = dict(state_dict["fisher"])
        self.fisher_done = int(state_dict["fisher_done"])
