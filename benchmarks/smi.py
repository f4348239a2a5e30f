"""Sparse vs dense model inversion, side by side: speed on a ViT-Tiny at 224 px, quality on MNIST-5k.

    python benchmarks/smi.py --out benchmarks/results/smi.json     # full (~15 min on 2 CPU cores)
    python benchmarks/smi.py --quick                               # smoke check (~2 min)

Speed: the same random-weight ViT-Tiny geometry (197 tokens), same batch and seeds, inverted densely
and with the default schedule (prune at 50/100/200/300 of 4000 iterations, keep 0.7 each time),
scaled in proportion to a shorter run. Reports images x iterations per second of both, their ratio
(``speedup``) and the FLOP ratio implied by the kept-token counts (``flop_bound_speedup``).

Quality: the demo teacher (configs/smi/demo_teacher.yaml, trained if missing) is inverted densely
and sparsely with the same seeds; a pre-trained student (demo_student.yaml) is linear-probed by
distillation on each pool (knowledge transfer, as configs/smi/demo_kd.yaml) and a
W4/A8 PSAQ quantiser is calibrated on 32 images of each, both evaluated on real held-out MNIST-5k.
"Equal wall-clock" gives the sparse inversion the time the dense one took (more images).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from tqdm import tqdm  # noqa: E402

from callbacks.token_dropping import SparseTokenDropping  # noqa: E402
from datamodules.smi import SMIDataModule  # noqa: E402
from lit_modules.smi import SMIModule  # noqa: E402
from lit_modules.smi_kd import SMIDistillationModule  # noqa: E402
from lit_modules.smi_ptq import SMIQuantizationModule  # noqa: E402

DEMO = REPO / "configs" / "smi"
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # keep the table readable
PAPER_SCHEDULE, PAPER_ITERATIONS = (50, 100, 200, 300), 4000


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, **kwargs)


def scaled_schedule(iterations: int) -> list[int]:
    """The paper's prune iterations scaled to a run of ``iterations`` steps."""
    return [max(1, round(t * iterations / PAPER_ITERATIONS)) for t in PAPER_SCHEDULE]


def invert(module_args: dict, prune: list[int] | None, out: Path, **overrides) -> float:
    """Run one inversion (``SMIModule`` + optional ``SparseTokenDropping``); return wall seconds."""
    module = SMIModule(**{**module_args, **overrides, "output_dir": str(out)})
    callbacks = [SparseTokenDropping(prune, 0.7)] if prune else []
    fit = trainer(max_epochs=1, callbacks=callbacks)
    start = time.perf_counter()
    fit.fit(module)
    return time.perf_counter() - start


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
    iterations, batch = (80, 2) if quick else (600, 16)
    prune = [2, 4, 6, 8] if quick else scaled_schedule(iterations)
    args = dict(teacher="vit_tiny_patch16_224", teacher_kwargs={"num_classes": 1000}, batch_size=batch,
                iterations=iterations, seed=0)
    invert(args, prune, tmp / "warmup", iterations=12)  # warm-up: allocator, kernels, imports
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


def demo_config(name: str) -> dict:
    return yaml.safe_load((DEMO / name).read_text())


def stage_weights(config: str) -> Path:
    """Weights exported by a demo training stage (the teacher or the student), trained if missing."""
    path = REPO / demo_config(config)["model"]["init_args"]["export_path"]
    if not path.is_file():
        from train import cli_main

        print(f"training configs/smi/{config} ...")
        os.chdir(REPO)
        cli_main(["fit", "--config", str(DEMO / config), "--trainer.enable_progress_bar=false"])
    return path


def teacher_file() -> Path:
    return stage_weights("demo_teacher.yaml")


def data(pool: Path | None, budget: int | None = None, seed: int = 0, **kwargs) -> SMIDataModule:
    base = demo_config("demo_kd.yaml")["data"]["init_args"]
    if pool is not None:
        base = {**base, "inverted_dir": str(pool), "num_inverted": budget}
    return SMIDataModule(**{**base, "seed": 0, **kwargs})


def distil(pool: Path, budget: int, seed: int, epochs: int) -> float:
    L.seed_everything(seed, verbose=False)
    args = {**demo_config("demo_kd.yaml")["model"]["init_args"], "teacher_checkpoint": str(teacher_file()),
            "student_checkpoint": str(stage_weights("demo_student.yaml"))}
    module = SMIDistillationModule(**args)
    fit = trainer(max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0)
    dm = data(pool, budget)
    fit.fit(module, datamodule=dm)
    return fit.test(module, datamodule=dm, verbose=False)[0]["test/acc"]


def quantise(pool: Path, budget: int) -> tuple[float, float]:
    args = {**demo_config("demo_ptq.yaml")["model"]["init_args"], "checkpoint": str(teacher_file())}
    module = SMIQuantizationModule(**args)
    dm = data(pool, budget, batch_size=32)
    fit = trainer(max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0)
    fit.fit(module, datamodule=dm)
    metrics = fit.test(module, datamodule=dm, verbose=False)[0]
    return metrics["test/acc"], metrics["test/acc_fp"]


def quality(quick: bool, tmp: Path) -> dict:
    cfg = demo_config("demo.yaml")
    args = {**cfg["model"]["init_args"], "teacher_checkpoint": str(teacher_file())}
    prune = cfg["trainer"]["callbacks"][0]["init_args"]["prune_iterations"]
    batches, iterations, seeds, epochs = (1, 60, [0], 5) if quick else (4, args["iterations"], [0, 1, 2], 30)
    args.update(iterations=iterations, num_batches=batches)
    budget = batches * args["batch_size"]
    t_dense = invert(args, None, tmp / "q_dense")
    t_sparse = invert(args, prune, tmp / "q_sparse")
    equal_time_batches = max(batches, int(batches * t_dense / t_sparse))
    invert(args, prune, tmp / "q_sparse_time", num_batches=equal_time_batches)
    pools = {"dense": (tmp / "q_dense", budget), "sparse": (tmp / "q_sparse", budget),
             "sparse_equal_time": (tmp / "q_sparse_time", equal_time_batches * args["batch_size"])}
    out: dict = {"quality_setting": {
        "teacher": "demo ViT (embed 96, depth 4, patch 4, 32 px) on MNIST-5k", "images_per_pool": budget,
        "equal_time_images": pools["sparse_equal_time"][1], "iterations": iterations, "prune_iterations": prune,
        "kd_seeds": seeds, "kd_epochs": epochs, "calibration_images": 32,
        "inversion_seconds": {"dense": t_dense, "sparse": t_sparse}}}
    for name, (pool, size) in tqdm(pools.items(), desc="downstream"):
        accs = [distil(pool, size, seed, epochs) for seed in seeds]
        out[f"kd_acc_{name}"] = statistics.mean(accs)
        out[f"kd_acc_{name}_std"] = statistics.pstdev(accs)
        calibration = 32 if name != "sparse_equal_time" else min(size, round(32 * t_dense / t_sparse))
        out[f"ptq_w4a8_acc_{name}"], out["teacher_test_acc"] = quantise(pool, calibration)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short smoke run (about two minutes)")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--skip", choices=["speed", "quality"], help="leave one half out")
    args = parser.parse_args()
    torch.manual_seed(0)
    results: dict = {"mode": "quick" if args.quick else "full", "torch_threads": torch.get_num_threads()}
    with TemporaryDirectory() as tmp:
        if args.skip != "speed":
            results.update(speed(args.quick, Path(tmp)))
        if args.skip != "quality":
            results.update(quality(args.quick, Path(tmp)))
    width = max(map(len, results))
    for key, value in results.items():
        if not isinstance(value, dict):
            print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
