"""Inversion timing for ``benchmarks/smi.py``: a timed inversion run, and dense vs sparse speed on a
ViT-Tiny at 224 px against the FLOP ratio its kept-token schedule implies."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L

from callbacks.token_dropping import SparseTokenDropping
from lit_modules.smi import SMIModule

PAPER_SCHEDULE, PAPER_ITERATIONS = (50, 100, 200, 300), 4000


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, **kwargs)


def scaled_schedule(iterations: int) -> list[int]:
    """The paper's prune iterations scaled to a run of ``iterations`` steps."""
    return [max(1, round(t * iterations / PAPER_ITERATIONS)) for t in PAPER_SCHEDULE]


class StepTimer(L.Callback):
    """Seconds spent in inversion steps: token drops included (listed before the dropping callback, its
    batch-start hook runs first), setup and writing the pool excluded (``writing``, subtracted).

    On the CPU a step has finished when its hook returns, so a host clock per step syncs nothing."""

    def __init__(self) -> None:
        self.seconds, self.writing, self._start = 0.0, 0.0, 0.0

    def setup(self, trainer: L.Trainer, pl_module: SMIModule, stage: str) -> None:
        finish = pl_module._finish_batch

        def timed_finish(batch_id: int) -> None:
            start = time.perf_counter()
            finish(batch_id)
            self.writing += time.perf_counter() - start

        pl_module._finish_batch = timed_finish

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.seconds += time.perf_counter() - self._start


def invert(module_args: dict, prune: list[int] | None, out: Path, **overrides) -> float:
    """Run one inversion (``SMIModule`` + optional ``SparseTokenDropping``); return its step seconds."""
    module = SMIModule(**{**module_args, **overrides, "output_dir": str(out), "overwrite": True})
    timer = StepTimer()
    trainer(max_epochs=1, callbacks=[timer] + ([SparseTokenDropping(prune, 0.7)] if prune else [])).fit(module)
    return timer.seconds - timer.writing


def block_flops(tokens: int, dim: int, depth: int, patch_dim: int, prefix: int) -> float:
    """Multiply-adds of the token-dependent forward: patch projection plus ``depth`` blocks."""
    return (tokens - prefix) * patch_dim * dim + depth * (12 * tokens * dim**2 + 2 * tokens**2 * dim)


def flop_bound(iterations: int, prune: list[int], patches: int, **geometry) -> float:
    """Dense / sparse FLOPs over a run, from the kept-token count at every iteration."""
    counts = SparseTokenDropping(prune, 0.7).keep_counts(patches)
    dense = sparse = 0.0
    for it in range(iterations):
        kept = next((c for t, c in zip(reversed(prune), reversed(counts)) if it >= t), patches)
        dense += block_flops(patches + 1, **geometry)
        sparse += block_flops(kept + 1, **geometry)
    return dense / sparse


def speed(quick: bool, tmp: Path) -> dict:
    iterations, batch = (80, 2) if quick else (160, 8)
    prune = [2, 4, 6, 8] if quick else scaled_schedule(iterations)
    args = dict(teacher="vit_tiny_patch16_224", teacher_kwargs={"num_classes": 1000}, batch_size=batch,
                iterations=iterations, seed=0)
    invert(args, prune, tmp / "warmup", iterations=prune[-1] + 2)  # warm-up: allocator, kernels, imports
    dense = invert(args, None, tmp / "dense")
    sparse = invert(args, prune, tmp / "sparse")
    bound = flop_bound(iterations, prune, 196, dim=192, depth=12, patch_dim=3 * 16 * 16, prefix=1)
    work = batch * iterations
    return {
        "speed_setting": {"model": "vit_tiny_patch16_224 (random weights)", "image_size": 224, "batch": batch,
                          "iterations": iterations, "prune_iterations": prune, "keep_ratio": 0.7,
                          "kept_patches": SparseTokenDropping(prune, 0.7).keep_counts(196)},
        "dense_images_x_iterations_per_s": work / dense,
        "sparse_images_x_iterations_per_s": work / sparse,
        "speedup": dense / sparse,
        "flop_bound_speedup": bound,
        "speedup_over_bound": dense / sparse / bound,
    }
