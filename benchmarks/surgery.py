"""The Surgery/SurgeryV2 papers' table on the offline demo suite, every number measured in this process.

Builds the demo suite through the demo configs (theta_0 pre-trained on MNIST, experts fine-tuned on
photos / rotation / digits / LFW), then for every merge - weight averaging, task arithmetic (0.3),
TIES (20 %, dis-sum, 0.3), task-wise and layer-wise AdaMerging - evaluates the plain merged model,
Surgery (V1) and SurgeryV2, each trained with the same steps, and the individual experts.

    OMP_NUM_THREADS=1 python benchmarks/surgery.py --out benchmarks/results/surgery.json  # full (~7 min)
    OMP_NUM_THREADS=1 python benchmarks/surgery.py --quick --out /tmp/surgery_quick.json  # smoke run

On a machine shared with other jobs keep ``OMP_NUM_THREADS=1``: with 2 threads on 2 busy cores the
run was over 10x slower (thread oversubscription).

Keys of the JSON: ``acc`` (method -> variant -> average accuracy), ``acc_individual``,
``acc_per_task`` (method -> variant -> task -> accuracy), ``gap_closed_surgery`` and
``gap_closed_surgeryv2`` ((acc_variant - acc_plain) / (acc_individual - acc_plain) per method),
``train_seconds`` and ``time_relative_to_adamerging`` (Surgery/SurgeryV2 training time over
layer-wise AdaMerging's), ``settings``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import train  # noqa: E402
from core.timm_models import export_weights  # noqa: E402
from datamodules.surgery import SurgeryDataModule  # noqa: E402
from lit_modules.surgery import AdaMergingModule, SurgeryModule  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "surgery"
TASKS = ("photos", "rotation", "digits", "lfw")
VIT = {"img_size": 32, "patch_size": 8, "in_chans": 1, "num_classes": 48, "embed_dim": 96, "depth": 4, "num_heads": 3}
METHODS = ("weight_average", "task_arithmetic", "ties", "adamerging_task", "adamerging_layer")
VARIANTS = ("plain", "surgery", "surgeryv2")


def build_suite(work: Path, quick: bool, retrain: bool) -> dict:
    """theta_0 and the 4 experts via the demo configs (reused from ``work`` unless ``retrain``)."""
    quiet = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
             f"--trainer.default_root_dir={work}"]
    pre = work / "pretrained.safetensors"
    if retrain or not pre.is_file():
        epochs = ["--trainer.max_epochs=3"] if quick else []
        train.cli_main(["fit", "--config", str(CONFIGS / "demo_pretrain.yaml"), f"--model.init_args.export_path={pre}",
                        *quiet, *epochs])
    experts = {}
    for task in TASKS:
        out = work / "experts" / f"{task}.safetensors"
        if retrain or not out.is_file():
            overlay = [] if task == "photos" else ["--config", str(CONFIGS / f"demo_expert_{task}.yaml")]
            epochs = ["--trainer.max_epochs=2"] if quick else []
            train.cli_main(["fit", "--config", str(CONFIGS / "demo_expert.yaml"), *overlay,
                            f"--model.init_args.checkpoint={pre}", f"--model.init_args.export_path={out}", *quiet, *epochs])
        experts[task] = str(out)
    return {"model": "vit_tiny_patch16_224", "model_kwargs": VIT, "pretrained_checkpoint": str(pre), "experts": experts}


def trainer(steps: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)


def fit(module: L.LightningModule, data: SurgeryDataModule, steps: int) -> float:
    start = time.perf_counter()
    trainer(steps).fit(module, datamodule=data)
    return time.perf_counter() - start


def evaluate(module: L.LightningModule, data: SurgeryDataModule) -> dict[str, float]:
    runner = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    results = runner.validate(module, datamodule=data, verbose=False)
    return {t: float(results[i][f"val/acc_{t}"]) for i, t in enumerate(TASKS)}


@torch.no_grad()
def individual(module: SurgeryModule, data: SurgeryDataModule) -> dict[str, float]:
    """Each expert with its own head on its own task's labelled test images."""
    accs = {}
    for i, (task, loader) in enumerate(zip(TASKS, data.val_dataloader())):
        hits = total = 0
        for batch in loader:
            pred = module.heads(module.experts[i](batch["image"]), task).argmax(-1)
            hits += int((pred == batch["label"]).sum())
            total += len(pred)
        accs[task] = hits / total
    return accs


def mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps and epochs: a smoke run of about a minute")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--work", type=Path, default=None, help="where theta_0/experts are kept (runs/surgery/bench[_quick])")
    parser.add_argument("--retrain", action="store_true", help="re-train theta_0 and the experts even if present")
    parser.add_argument("--steps", type=int, default=None, help="surgery steps per task (default 1000; quick 40)")
    parser.add_argument("--adamerging-steps", type=int, default=None, help="AdaMerging steps (default 500; quick 20)")
    parser.add_argument("--rank", type=int, default=16, help="rank of every surgery module")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    steps = args.steps or (40 if args.quick else 1000)
    ada_steps = args.adamerging_steps or (20 if args.quick else 500)
    work = args.work or Path("runs/surgery/bench_quick" if args.quick else "runs/surgery/bench")

    L.seed_everything(args.seed, verbose=False)
    files = build_suite(work, args.quick, args.retrain)
    data = SurgeryDataModule(tasks=list(TASKS), stage="adapt", batch_size=16, seed=args.seed)
    data.setup()
    acc, per_task, seconds = {}, {}, {}
    merges = {}
    for method in tqdm(METHODS, desc="merges"):
        if method.startswith("adamerging"):
            L.seed_everything(args.seed, verbose=False)
            ada = AdaMergingModule(**files, granularity=method.removeprefix("adamerging_"), lr=1e-3)
            seconds[method] = fit(ada, data, ada_steps)
            path = work / f"{method}.safetensors"
            export_weights(ada.merged_encoder(), path)
            merges[method] = {"merge": "checkpoint", "merged_checkpoint": str(path)}
        else:
            merges[method] = {"merge": method}
        per_task[method] = {}
        for variant in tqdm(VARIANTS, desc=method, leave=False):
            L.seed_everything(args.seed, verbose=False)
            module = SurgeryModule(**files, **merges[method], version="v2" if variant == "surgeryv2" else "v1",
                                   rank=args.rank, lr=1e-3)
            if variant != "plain":
                seconds[f"{method}/{variant}"] = fit(module, data, steps)
            elif "individual" not in per_task:
                per_task["individual"] = individual(module, data)
            per_task[method][variant] = evaluate(module, data)
        acc[method] = {v: mean(per_task[method][v]) for v in VARIANTS}

    acc_individual = mean(per_task["individual"])
    # undefined (None) where the merge is already within 1 point of the experts: nothing to close
    gap = {v: {m: (acc[m][v] - acc[m]["plain"]) / (acc_individual - acc[m]["plain"])
               if acc_individual - acc[m]["plain"] > 0.01 else None for m in METHODS} for v in ("surgery", "surgeryv2")}
    relative = {v: {m: seconds[f"{m}/{v}"] / seconds["adamerging_layer"] for m in METHODS} for v in ("surgery", "surgeryv2")}
    result = {
        "acc": acc, "acc_individual": acc_individual, "acc_per_task": per_task,
        "gap_closed_surgery": gap["surgery"], "gap_closed_surgeryv2": gap["surgeryv2"],
        "train_seconds": seconds, "time_relative_to_adamerging": relative,
        "settings": {"quick": args.quick, "surgery_steps_per_task": steps, "adamerging_steps": ada_steps,
                     "rank": args.rank, "batch_per_task": 16, "lr": 1e-3, "tasks": list(TASKS), "vit": VIT,
                     "threads": torch.get_num_threads(), "protocol": "transductive: adapt and evaluate on test split"},
    }
    print(f"\n{'method':18s} {'plain':>7s} {'surgery':>8s} {'surgeryv2':>9s} {'gap V1':>7s} {'gap V2':>7s}")
    for m in METHODS:
        print(f"{m:18s} {acc[m]['plain']:7.3f} {acc[m]['surgery']:8.3f} {acc[m]['surgeryv2']:9.3f} "
              f"{gap['surgery'][m] if gap['surgery'][m] is not None else float('nan'):7.2f} "
              f"{gap['surgeryv2'][m] if gap['surgeryv2'][m] is not None else float('nan'):7.2f}")
    print(f"{'individual':18s} {acc_individual:7.3f}")
    print("per task individual:", {t: round(a, 3) for t, a in per_task["individual"].items()})
    print("train seconds:", {k: round(v, 1) for k, v in seconds.items()})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
