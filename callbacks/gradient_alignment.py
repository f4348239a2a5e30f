"""GradientAlignment: how a multi-task module combines its tasks' losses into one update.

Modes (the rules live in ``core.gradient_alignment``):

- ``sequential``: FREE's implicit gradient alignment (Wei et al., CVPR 2024, Sec. 3.2): Reptile over the
  tasks in turn, one inner step each (``inner_optimizer`` sgd, or adam as the FREE release), update
  direction ``alpha (theta - theta_fast)`` (release alpha = 67 with Adam inner steps of lr 1e-3).
- ``displacement``: TGR's implicit gradient regularisation (Wei et al., ICML 2024): every task's loss at
  ``theta - alpha (g_bar - g_i)``, differentiated through the gradients (release alpha = 1e-3).
- ``pcgrad``: projecting conflicting gradients (Yu et al., NeurIPS 2020).
- ``mean``: the plain mean of the task losses (what the module does without the callback; for ablations).

The module implements ``core.protocols.SupportsGradientAlignment``. In DDP every task gradient is
averaged over ranks before the rule combines them, so all ranks take the same step, equal to one
process on the global batch.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import lightning as L
import torch

from core import gradient_alignment as rules
from core.protocols import SupportsGradientAlignment, require_protocol
from core.rng import keyed_generator


class GradientAlignment(L.Callback):
    """Install a multi-task update rule on a module.

    Args:
        mode: ``sequential``, ``displacement``, ``pcgrad`` or ``mean``.
        alpha: pseudo-gradient scale (``sequential``) or displacement size (``displacement``).
        inner_lr: inner step size of ``sequential``.
        inner_optimizer: ``sgd`` (Reptile) or ``adam`` (one Adam over the task sequence, the FREE release).
        betas: Adam betas of the ``adam`` inner optimiser.
        seed: seed of pcgrad's random projection order (keyed by the global step).
    """

    def __init__(self, mode: Literal["sequential", "displacement", "pcgrad", "mean"] = "sequential",
                 alpha: float = 1.0, inner_lr: float = 0.01, inner_optimizer: Literal["sgd", "adam"] = "sgd",
                 betas: tuple[float, float] = (0.9, 0.999), seed: int = 0) -> None:
        if mode not in ("sequential", "displacement", "pcgrad", "mean"):
            raise ValueError(f"GradientAlignment mode={mode!r}: use sequential, displacement, pcgrad or mean")
        if inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"GradientAlignment inner_optimizer={inner_optimizer!r}: use sgd or adam")
        self.mode, self.alpha, self.inner_lr, self.inner_optimizer = mode, alpha, inner_lr, inner_optimizer
        self.betas, self.seed = tuple(betas), seed
        self._trainer: L.Trainer | None = None

    def rule(self) -> Any:
        """The rule for the current configuration, ``rule(loss_fn, params, n_tasks) -> gradients``."""
        if self.mode == "sequential":
            return partial(rules.sequential_gradient, alpha=self.alpha, inner_lr=self.inner_lr,
                           inner_optimizer=self.inner_optimizer, betas=self.betas)
        if self.mode == "displacement":
            return partial(rules.displacement_gradient, alpha=self.alpha)
        if self.mode == "pcgrad":
            return self._pcgrad
        return rules.mean_gradient

    def _pcgrad(self, loss_fn: Any, params: dict[str, torch.Tensor], n_tasks: int) -> dict[str, torch.Tensor]:
        step = self._trainer.global_step if self._trainer is not None else 0
        return rules.pcgrad_gradient(loss_fn, params, n_tasks, generator=keyed_generator(self.seed, step))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_protocol(pl_module, SupportsGradientAlignment, "GradientAlignment")
        self._trainer = trainer
        pl_module.set_gradient_rule(self.rule())

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.set_gradient_rule(None)

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "alpha": self.alpha}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mode", self.mode) != self.mode:
            raise ValueError(f"the checkpoint was trained with GradientAlignment mode={state_dict['mode']!r}, "
                             f"this run sets mode={self.mode!r}: resume with the same mode")
