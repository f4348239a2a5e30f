"""Episode evaluation and meta-val model selection shared by the data-free meta-learners (free, tgr).

Every validation and test batch is one N-way K-shot episode ``(support, query)``. The meta-learner
``self.learner`` is scored by MAML fine-tuning (the papers' protocol: ``test_steps`` steps at ``test_lr``
with transductive BatchNorm) or by ProtoNet prototypes of its features. Validation keeps the learner with
the best mean episode accuracy (selection on meta-val; the releases select on meta-test), and testing
restores it first, then writes every episode's accuracy under the run directory so the numbers can be
re-scored. The hooks only touch ``self.trainer``, ``self.log_dict`` and ``self.hparams`` of the module they
are mixed into, so this file stays pure torch (no lightning import).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from torch import Tensor

from core.episodes import mean_ci95
from core.maml import maml_accuracy, protonet_accuracy
from core.run_dir import run_directory


class EpisodicEvaluation:
    """Mixin for a LightningModule (list it first among the bases) with a meta-learner ``self.learner``.

    The module's hyper-parameters must hold ``evaluation`` (``maml`` | ``protonet``), ``test_steps`` and
    ``test_lr``; its ``__init__`` calls :meth:`init_selection` once ``self.learner`` exists, and its
    checkpoint hooks save :meth:`selection_state` and restore it with :meth:`load_selection_state`.
    """

    def init_selection(self) -> None:
        """Start with the initial learner as the selected one (kept if validation never improves on it)."""
        self.best_val, self.best_state = -1.0, copy.deepcopy(self.learner.state_dict())
        self._eval_acc: list[Tensor] = []
        self.test_accuracies: Tensor | None = None

    def selection_state(self) -> dict[str, Any]:
        return {"best_val": self.best_val, "best_state": self.best_state}

    def load_selection_state(self, state: dict[str, Any]) -> None:
        self.best_val, self.best_state = state["best_val"], state["best_state"]

    def _episode_accuracy(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        support, query = batch
        if self.hparams.evaluation == "protonet":
            return protonet_accuracy(self.learner.features, support, query)
        with torch.inference_mode(False), torch.enable_grad():  # MAML fine-tunes even under Lightning's eval
            return maml_accuracy(self.learner, support, query, self.hparams.test_steps, self.hparams.test_lr)

    def on_validation_epoch_start(self) -> None:
        self._eval_acc = []

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_acc.append(self._episode_accuracy(batch))

    def on_validation_epoch_end(self) -> None:
        mean, ci = mean_ci95(torch.cat(self._eval_acc).cpu())  # once per evaluation, not per step
        self.log_dict({"val/acc": mean, "val/acc_ci95": ci})
        if not self.trainer.sanity_checking and mean > self.best_val:  # model selection on meta-val
            self.best_val, self.best_state = mean, copy.deepcopy(self.learner.state_dict())

    def on_test_epoch_start(self) -> None:
        self._eval_acc = []
        if self.best_val >= 0:
            self.learner.load_state_dict(self.best_state)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_acc.append(self._episode_accuracy(batch))

    def on_test_epoch_end(self) -> None:
        self.test_accuracies = torch.cat(self._eval_acc).cpu()
        mean, ci = mean_ci95(self.test_accuracies)
        self.log_dict({"test/acc": mean, "test/acc_ci95": ci})
        out = run_directory(self.trainer) / "test_episode_accuracies.json"  # collective: every rank
        if self.trainer.is_global_zero:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"mean": mean, "ci95": ci, "accuracies": self.test_accuracies.tolist()}))
