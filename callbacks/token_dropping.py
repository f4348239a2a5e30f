"""Sparse token dropping: the schedule of Sparse Model Inversion as a reusable callback.

Hu et al., "Sparse Model Inversion" (ICML 2024): at each prune iteration ``t_i`` the module keeps
``int(n * keep_ratio_i)`` of its ``n`` remaining patch tokens (ratios are relative to what remains;
the default 4 x 0.7 keeps 196 -> 137 -> 95 -> 66 -> 46 patches of a DeiT/16 at 224 px). Step ``t - 1``
records the patch scores and step ``t`` already runs on the reduced set; both steps skip input
augmentation so that scores and the patch grid stay aligned (the module implements that part).

The callback owns the schedule and its history; the module owns the mechanism through
``core.protocols.SupportsTokenDropping``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L

from core.protocols import SupportsTokenDropping, require_protocol


class SparseTokenDropping(L.Callback):
    """Drop patch tokens on a fixed schedule of training steps.

    Args:
        prune_iterations: steps (within the module's schedule, see ``token_schedule_step``) at which
            tokens are dropped. Each must lie in [1, schedule length) (the scores come from the step
            before; a drop at 1 scores the first step) and consecutive events at least 2 steps apart
            (the release silently skipped such events).
        keep_ratio: fraction of the *remaining* patches kept at each event, in (0, 1]; one value for
            all events or one per event. The paper's default drops 30 % four times (0.7).
    """

    def __init__(
        self,
        prune_iterations: Sequence[int] = (50, 100, 200, 300),
        keep_ratio: float | Sequence[float] = 0.7,
    ) -> None:
        its = [int(t) for t in prune_iterations]
        ratios = [float(keep_ratio)] * len(its) if isinstance(keep_ratio, (int, float)) else [float(r) for r in keep_ratio]
        if len(ratios) != len(its):
            raise ValueError(
                f"keep_ratio has {len(ratios)} values but prune_iterations has {len(its)}: give one ratio or one per event"
            )
        for r in ratios:
            if not 0.0 < r <= 1.0:
                raise ValueError(f"keep_ratio must lie in (0, 1], got {r}")
        if its and its[0] < 1:
            raise ValueError(f"prune_iterations must be >= 1 (scores come from the previous step), got {its[0]}")
        if any(b - a < 2 for a, b in zip(its, its[1:])):
            raise ValueError(f"prune_iterations must increase by at least 2 between events, got {its}")
        self.prune_iterations = its
        self.keep_ratios = ratios
        self.history: list[dict[str, int]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_protocol(pl_module, SupportsTokenDropping, type(self).__name__)
        pl_module.num_kept_patches()  # a module that cannot drop tokens (a CNN teacher) raises here
        length = pl_module.token_schedule_length()
        late = [t for t in self.prune_iterations if t >= length]
        if late:
            raise ValueError(
                f"prune_iterations {late} lie at or beyond the {length} steps of a schedule and would never "
                f"happen: use values in [1, {length - 1}] (or raise model.init_args.iterations)"
            )

    def keep_counts(self, num_patches: int) -> list[int]:
        """Patch counts after each event when starting from ``num_patches`` (K_i = int(K_{i-1} * r_i))."""
        counts, n = [], num_patches
        for r in self.keep_ratios:
            n = max(1, int(n * r))
            counts.append(n)
        return counts

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = pl_module.token_schedule_step()
        if step + 1 in self.prune_iterations:
            pl_module.prepare_token_drop()
        if step in self.prune_iterations:
            ratio = self.keep_ratios[self.prune_iterations.index(step)]
            before = pl_module.num_kept_patches()
            keep = max(1, int(before * ratio))
            pl_module.drop_patches(keep)
            self.history.append({"global_step": trainer.global_step, "step": step, "before": before, "kept": keep})
            pl_module.log("train/kept_patches", float(keep), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"prune_iterations": self.prune_iterations, "keep_ratios": self.keep_ratios, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["prune_iterations"] != self.prune_iterations or state_dict["keep_ratios"] != self.keep_ratios:
            raise ValueError(
                "the checkpoint was written with another token-dropping schedule "
                f"({state_dict['prune_iterations']}, {state_dict['keep_ratios']}); resume with the same "
                "trainer.callbacks SparseTokenDropping init_args"
            )
        self.history = list(state_dict["history"])
