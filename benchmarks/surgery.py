"""The Surgery/SurgeryV2 papers' table on the offline demo suite, in the papers' regime, over seeds.

theta_0 is pre-trained broadly (100 classes: glyphs, MNIST digits, photo crops; ``demo_pretrain.yaml``),
the experts are fine-tuned from it with frozen heads (``demo_expert*.yaml``): theta_0's class means of
all merged tasks made orthonormal together (``head: joint``), the stand-in for CLIP's text heads. Every
merge - weight averaging, task arithmetic, TIES (20 %, dis-sum), task-wise and layer-wise AdaMerging - is
evaluated plain, with Surgery V1 (rank 16, faithful), with V1 at V2's parameter count (``rank_matched``)
and with SurgeryV2 (rank 16), every variant trained for the same steps; the floor is theta_0 zero-shot,
the ceiling the experts. Task arithmetic's and TIES's lambda is chosen from ``SCALINGS`` on held-out
validation images (150 per task, taken out of the experts' training images; ``tuning_dataloader``),
never on test. Surgery and AdaMerging then follow the papers: transductive (adapt on the unlabelled test
images, evaluate on them), with the papers' hyper-parameters.

Seeds: theta_0 and the experts are trained once and shared by all seeds, as the papers share one public
CLIP and its released experts (and retraining them per seed would triple the run's longest stage, the
experts'); so ``acc_zero_shot`` and ``acc_experts`` have std 0 by construction, and so do the plain
WA/TA/TIES merges. Each seed re-runs AdaMerging (its batches) and every surgery (W_down init and batches):
the variance the authors report, +-0.5-1 point. The data splits are fixed (seed 0). Cached
theta_0/experts live under ``--work`` in folders named by a hash of what produced them (config files,
code, seed, quick); a change makes a new folder.

    OMP_NUM_THREADS=1 python benchmarks/surgery.py --out benchmarks/results/surgery.json   # full, ~25 min
    OMP_NUM_THREADS=1 python benchmarks/surgery.py --quick --out /tmp/surgery_quick.json   # smoke run

Keys of the JSON (accuracies as fractions, ``{mean, std}`` over seeds): ``acc_zero_shot``,
``acc_experts``, ``acc_plain[m]``, ``acc_surgery[m]``, ``acc_surgery_matched[m]``, ``acc_surgeryv2[m]``
for ``m`` in ``wa, ta, ties, adamerging_task, adamerging_layer``; ``gap_closed_<variant>[m]`` =
(acc_variant - acc_plain) / (acc_experts - acc_plain); ``curves`` (accuracy every ``--eval-every``
steps); ``adamerging_entropy`` (init/end); ``checks`` (regime, experts' fit, targets); ``settings``.
Per-seed outputs go to ``<out>_raw.json``; figures (curves, per-layer bias, table) next to the JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from tqdm import tqdm  # noqa: E402

import train  # noqa: E402
from benchmarks.surgery_figures import draw  # noqa: E402
from core.timm_models import export_weights  # noqa: E402
from datamodules.surgery import SurgeryDataModule  # noqa: E402
from datamodules.surgery_tasks import DEMO_EXPERT_TASKS  # noqa: E402
from lit_modules.surgery import SurgeryModule  # noqa: E402
from lit_modules.surgery_adamerging import AdaMergingModule  # noqa: E402
from lit_modules.surgery_parts import entropy  # noqa: E402

CONFIGS = REPO / "configs" / "surgery"
TASKS = DEMO_EXPERT_TASKS
VIT = {"img_size": 32, "patch_size": 8, "in_chans": 1, "num_classes": 48, "embed_dim": 64, "depth": 4, "num_heads": 2}
MERGES = {"wa": "weight_average", "ta": "task_arithmetic", "ties": "ties", "adamerging_task": "task",
          "adamerging_layer": "layer"}
VARIANTS = ("surgery", "surgery_matched", "surgeryv2")
SCALINGS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # lambda grid of task arithmetic / TIES
# what theta_0 and the experts are made by: a change to any of these files gives a new cache folder
SOURCES = ("lit_modules/surgery_expert.py", "lit_modules/surgery_parts.py", "datamodules/surgery.py",
           "datamodules/surgery_tasks.py", "datamodules/sources/glyphs.py", "datamodules/sources/glyph_classes.py",
           "datamodules/sources/glyph_fonts.py", "datamodules/sources/images.py", "core/timm_models.py", "train.py")
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def stage_key(*parts: object, files: tuple[str, ...] = ()) -> str:
    """Hash of the arguments and of the named files' contents: the name of a cached stage's folder."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode())
    for name in files:
        digest.update((REPO / name).read_bytes())
    return digest.hexdigest()[:12]


def cached_stage(folder: Path, produce) -> Path:
    """Run ``produce(folder)`` unless ``folder`` holds a finished run (its ``done.json``)."""
    if not (folder / "done.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        produce(folder)
        (folder / "done.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return folder


def build_theta0(work: Path, quick: bool) -> Path:
    config = CONFIGS / "demo_pretrain.yaml"
    epochs = ["--trainer.max_epochs=1"] if quick else []
    key = stage_key("theta0", epochs, files=("configs/surgery/demo_pretrain.yaml", *SOURCES))
    folder = cached_stage(work / f"theta0-{key}", lambda f: train.cli_main(
        ["fit", "--config", str(config), f"--model.init_args.export_path={f / 'pretrained.safetensors'}",
         f"--trainer.default_root_dir={f}", *QUIET, *epochs]))
    return folder / "pretrained.safetensors"


def build_experts(work: Path, theta0: Path, seed: int, quick: bool) -> dict[str, str]:
    steps = ["--trainer.max_steps=20"] if quick else []
    configs = ["configs/surgery/demo_expert.yaml"] + [f"configs/surgery/demo_expert_{t}.yaml" for t in TASKS[1:]]
    key = stage_key("experts", theta0.parent.name, seed, steps, files=(*configs, *SOURCES))

    def produce(folder: Path) -> None:
        for task in TASKS:
            overlay = [] if task == TASKS[0] else ["--config", str(CONFIGS / f"demo_expert_{task}.yaml")]
            train.cli_main(["fit", "--config", str(CONFIGS / "demo_expert.yaml"), *overlay, f"--seed_everything={seed}",
                            f"--model.init_args.checkpoint={theta0}", f"--model.init_args.export_path={folder / task}.safetensors",
                            f"--trainer.default_root_dir={folder / task}", *QUIET, *steps])

    folder = cached_stage(work / f"experts-{key}", produce)
    return {t: str(folder / f"{t}.safetensors") for t in TASKS}


class Curve(Callback):
    """Records ``val/acc`` (mean over tasks) at every validation, keyed by the global step."""

    def __init__(self) -> None:
        self.points: dict[int, float] = {}

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.points[trainer.global_step] = float(trainer.callback_metrics["val/acc"])


def trainer(steps: int, eval_every: int | None = None, callbacks: list | None = None) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=1.0 if eval_every else 0, val_check_interval=eval_every,
                     check_val_every_n_epoch=None, callbacks=callbacks or [])


def per_task(report: dict, name: str) -> dict[str, float]:
    return {t: r[name]["acc"] for t, r in report.items()}


@torch.no_grad()
def mean_entropy(module: AdaMergingModule, data: SurgeryDataModule) -> float:
    """AdaMerging's objective on every test image: mean over tasks of the mean prediction entropy."""
    params = {k: v.detach() for k, v in module.merged_params().items()}
    values = []
    for loader in data.val_dataloader():
        batches = [(entropy(module.heads(module._represent(b["image"], params), b["task"][0])), len(b["image"]))
                   for b in loader]
        values.append(sum(e * n for e, n in batches) / sum(n for _, n in batches))
    return float(torch.stack(values).mean())


@torch.no_grad()
def train_accuracy(module: SurgeryModule, data: SurgeryDataModule) -> dict[str, float]:
    """Each expert on its own task's training images (does it fit its task?)."""
    out = {}
    for i, task in enumerate(module.tasks):
        x, y = data.splits[task]["train"]["labelled"].images, data.splits[task]["train"]["labelled"].labels
        out[task] = float((module.heads(module.experts[i](x), task).argmax(-1) == y).float().mean())
    return out


def matched_rank(module: SurgeryModule, rank: int) -> int:
    """V1's rank with V2's parameters per task: (sum_b 2 w_b r + 2 p r) / (2 p) (SurgeryV2's own V1 baseline)."""
    widths, proj = module._widths()
    return round(sum(2 * w * rank for w in widths + [proj]) / (2 * proj))


def task_files(theta0: Path, experts: dict[str, str]) -> dict:
    return {"model": "vit_tiny_patch16_224", "model_kwargs": VIT, "pretrained_checkpoint": str(theta0),
            "experts": experts, "report": False}


def select_scaling(theta0: Path, experts: dict[str, str], data: SurgeryDataModule) -> dict[str, dict]:
    """Task arithmetic's and TIES's lambda: the best mean accuracy of the plain merge on the held-out
    validation images (``tuning_dataloader``, disjoint from test), as the task arithmetic paper does."""
    out = {}
    for name in ("ta", "ties"):
        scores = {}
        for scaling in SCALINGS:
            module = SurgeryModule(**task_files(theta0, experts), merge=MERGES[name], scaling=scaling, version="v1")
            scores[scaling] = mean(per_task(module.representation_report(data.tuning_dataloader()), "plain"))
        out[name] = {"chosen": max(scores, key=scores.get), "val_acc": {str(k): v for k, v in scores.items()}}
    return out


def regime(theta0: Path, experts: dict[str, str], data: SurgeryDataModule, scaling: dict[str, float]) -> dict:
    """The regime check alone (``--regime-only``): theta_0 zero-shot, the experts and the plain WA/TA/TIES merges
    on the test images (no seed enters: nothing here is trained)."""
    files = task_files(theta0, experts)
    zero_shot = SurgeryModule(**files, merge="task_arithmetic", scaling=0.0, version="v1")  # theta_0 exactly
    report = zero_shot.representation_report(data.val_dataloader())
    out = {"acc_experts_train": train_accuracy(zero_shot, data), "acc_zero_shot": per_task(report, "plain"),
           "acc_experts": per_task(report, "expert"), "acc_plain": {}}
    for name in ("wa", "ta", "ties"):
        module = SurgeryModule(**files, merge=MERGES[name], **({"scaling": scaling[name]} if name in scaling else {}))
        out["acc_plain"][name] = per_task(module.representation_report(data.val_dataloader()), "plain")
    means = {k: mean(out[k]) for k in ("acc_experts_train", "acc_zero_shot", "acc_experts")}
    means["acc_plain"] = {m: mean(v) for m, v in out["acc_plain"].items()}
    margin = means["acc_plain"]["ta"] - means["acc_zero_shot"]
    checks = {"regime_ta_beats_zero_shot_by_5_points": margin >= 0.05, "ta_minus_zero_shot": margin,
              "every_plain_merge_beats_zero_shot": all(v > means["acc_zero_shot"] for v in means["acc_plain"].values()),
              "experts_fit_train_95": min(out["acc_experts_train"].values()) >= 0.95,
              "experts_min_train_acc": min(out["acc_experts_train"].values())}
    return {**means, "checks": checks, "per_task": out}


def run_seed(seed: int, theta0: Path, experts: dict[str, str], args: argparse.Namespace, data: SurgeryDataModule,
             scaling: dict[str, float]) -> dict:
    files = task_files(theta0, experts)
    out: dict = {"seed": seed, "acc_plain": {}, "curves": {}, "seconds": {}, "bias": {}, "adamerging_entropy": {}}
    for v in VARIANTS:
        out[f"acc_{v}"] = {}
    probe = SurgeryModule(**files, merge="weight_average", version="v2", rank=args.rank)
    rank_matched = matched_rank(probe, args.rank)
    zero_shot = SurgeryModule(**files, merge="task_arithmetic", scaling=0.0, version="v1")  # theta_0 exactly
    out["acc_experts_train"] = train_accuracy(zero_shot, data)
    zero = zero_shot.representation_report(data.val_dataloader())
    out["acc_zero_shot"], out["acc_experts"] = per_task(zero, "plain"), per_task(zero, "expert")
    for name, merge in tqdm(MERGES.items(), desc=f"seed {seed}", leave=False):
        if name.startswith("adamerging"):
            L.seed_everything(seed, verbose=False)
            ada = AdaMergingModule(**{k: v for k, v in files.items() if k != "report"}, granularity=merge, lr=1e-3)
            before = mean_entropy(ada, data)
            start = time.perf_counter()
            trainer(args.adamerging_steps).fit(ada, datamodule=data)
            out["seconds"][name] = time.perf_counter() - start
            out["adamerging_entropy"][name] = {"init": before, "end": mean_entropy(ada, data)}
            path = args.work / "merges" / f"seed{seed}-{name}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            export_weights(ada.merged_encoder(), path)
            merge_args = {"merge": "checkpoint", "merged_checkpoint": str(path)}
        else:
            merge_args = {"merge": merge, **({"scaling": scaling[name]} if name in scaling else {})}
        reports = {}
        for variant, version, rank in (("surgery", "v1", args.rank), ("surgery_matched", "v1", rank_matched),
                                       ("surgeryv2", "v2", args.rank)):
            L.seed_everything(seed, verbose=False)
            module = SurgeryModule(**files, **merge_args, version=version, rank=rank, lr=1e-3)
            if variant == "surgery":  # step 0 is the plain merge (W_up = 0)
                reports["plain"] = module.representation_report(data.val_dataloader())
                out["acc_plain"][name] = per_task(reports["plain"], "plain")
            curve = Curve()
            start = time.perf_counter()
            trainer(args.steps, args.eval_every, [curve]).fit(module, datamodule=data)
            out["seconds"][f"{name}/{variant}"] = time.perf_counter() - start
            reports[variant] = module.representation_report(data.val_dataloader())
            out[f"acc_{variant}"][name] = per_task(reports[variant], "corrected")
            out["curves"].setdefault(name, {})[variant] = {0: mean(out["acc_plain"][name]), **curve.points}
        out["bias"][name] = {"plain": mean_levels(reports["plain"], "plain"),
                             **{v: mean_levels(reports[v], "corrected") for v in VARIANTS}}
    out["rank_matched"] = rank_matched
    return out


def mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def mean_levels(report: dict, name: str) -> list[float]:
    return [sum(v) / len(report) for v in zip(*(r[name]["bias"] for r in report.values()))]


def stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def aggregate(raws: list[dict]) -> dict:
    """Means and stds over seeds of every average accuracy, gaps closed, curves and checks."""
    avg = lambda raw, key, m=None: mean(raw[key] if m is None else raw[key][m])  # noqa: E731
    result: dict = {"acc_zero_shot": stats([avg(r, "acc_zero_shot") for r in raws]),
                    "acc_experts": stats([avg(r, "acc_experts") for r in raws]),
                    "acc_experts_train": stats([avg(r, "acc_experts_train") for r in raws])}
    for key in ("acc_plain", *(f"acc_{v}" for v in VARIANTS)):
        result[key] = {m: stats([avg(r, key, m) for r in raws]) for m in MERGES}
    for v in VARIANTS:
        result[f"gap_closed_{v}"] = {m: statistics.fmean(
            (avg(r, f"acc_{v}", m) - avg(r, "acc_plain", m)) / (avg(r, "acc_experts") - avg(r, "acc_plain", m))
            for r in raws) for m in MERGES}
    steps = sorted(raws[0]["curves"]["ta"]["surgery"], key=int)
    result["curves"] = {m: {v: {str(s): statistics.fmean(r["curves"][m][v][s] for r in raws) for s in steps}
                            for v in VARIANTS} for m in MERGES}
    result["adamerging_entropy"] = {m: {w: stats([r["adamerging_entropy"][m][w] for r in raws]) for w in ("init", "end")}
                                    for m in ("adamerging_task", "adamerging_layer")}
    margin = [avg(r, "acc_plain", "ta") - avg(r, "acc_zero_shot") for r in raws]
    result["checks"] = {
        "regime_ta_beats_zero_shot_by_5_points": all(x >= 0.05 for x in margin),
        "ta_minus_zero_shot_per_seed": margin,
        "experts_fit_train_95": all(min(r["acc_experts_train"].values()) >= 0.95 for r in raws),
        "experts_min_train_acc": min(min(r["acc_experts_train"].values()) for r in raws),
        "surgery_ge_plain_every_merge": all(result["acc_surgery"][m]["mean"] >= result["acc_plain"][m]["mean"] for m in MERGES),
        "v2_gt_v1_every_merge": all(result["acc_surgeryv2"][m]["mean"] > result["acc_surgery"][m]["mean"] for m in MERGES),
        "target_v2_closes_80pct_every_merge": all(result["gap_closed_surgeryv2"][m] >= 0.8 for m in MERGES),
        "target_v1_closes_40pct_every_merge": all(result["gap_closed_surgery"][m] >= 0.4 for m in MERGES),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps and epochs: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here (raw and figures beside)")
    parser.add_argument("--work", type=Path, default=None, help="cache of theta_0/experts (runs/surgery/bench[_quick])")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="surgery steps, one batch of 16 per task each (150; quick 20)")
    parser.add_argument("--adamerging-steps", type=int, default=None, help="AdaMerging steps (100; quick 10)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between curve points (50; quick 10)")
    parser.add_argument("--rank", type=int, default=16, help="rank of Surgery V1 and of every V2 module")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--regime-only", action="store_true",
                        help="only zero-shot, experts and plain WA/TA/TIES on test (lambda chosen on val): the regime check")
    parser.add_argument("--from-raw", type=Path, nargs="+", default=None,
                        help="aggregate the per-seed <out>_raw.json files of earlier runs (e.g. one seed per process, "
                             "run after the cached stages exist) instead of running")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.steps = args.steps or (20 if args.quick else 150)
    args.adamerging_steps = args.adamerging_steps or (10 if args.quick else 100)
    args.eval_every = args.eval_every or (10 if args.quick else 50)
    args.work = args.work or REPO / ("runs/surgery/bench_quick" if args.quick else "runs/surgery/bench")
    run_args = {"quick": args.quick, "surgery_steps": args.steps, "adamerging_steps": args.adamerging_steps,
                "eval_every": args.eval_every, "rank": args.rank}

    if args.from_raw:
        raws = [raw for path in args.from_raw for raw in json.loads(path.read_text())]
        for raw in raws:  # JSON keys are strings: the curves' steps back to int
            raw["curves"] = {m: {v: {int(k): a for k, a in c.items()} for v, c in cs.items()} for m, cs in raw["curves"].items()}
        if any(r["run"] != raws[0]["run"] or r["tuning"] != raws[0]["tuning"] for r in raws):
            raise ValueError("--from-raw: the files come from runs with different settings or lambdas")
        run_args, tuning, theta0_name = raws[0]["run"], raws[0]["tuning"], raws[0]["theta0"]
    else:
        seeds = list(range(args.first_seed, args.first_seed + (args.seeds or (1 if args.quick else 3))))
        start = time.perf_counter()
        theta0 = build_theta0(args.work, args.quick)
        data = SurgeryDataModule(tasks=list(TASKS), stage="adapt", batch_size=16, seed=0)
        data.setup()
        experts = build_experts(args.work, theta0, 0, args.quick)
        tuning = select_scaling(theta0, experts, data)
        scaling = {name: t["chosen"] for name, t in tuning.items()}
        if args.regime_only:
            result = {**regime(theta0, experts, data, scaling), "settings": {
                "tasks": list(TASKS), "vit": VIT, "scaling_selected_on_val": tuning, "theta0": theta0.parent.name,
                "experts": Path(next(iter(experts.values()))).parent.name, "wall_seconds": time.perf_counter() - start}}
            print(json.dumps({k: v for k, v in result.items() if k != "per_task"}, indent=1))
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1))
            return
        raws = [run_seed(seed, theta0, experts, args, data, scaling) for seed in tqdm(seeds, desc="seeds")]
        theta0_name = theta0.parent.name
        for raw in raws:
            raw.update(run=run_args, tuning=tuning, theta0=theta0_name, wall_seconds=time.perf_counter() - start)
    result = aggregate(raws)
    result["settings"] = {**run_args, "seeds": [r["seed"] for r in raws], "rank_matched": raws[0]["rank_matched"],
                          "batch_per_task": 16, "lr": 1e-3, "tasks": list(TASKS), "vit": VIT,
                          "scaling_selected_on_val": tuning, "threads": torch.get_num_threads(), "theta0": theta0_name,
                          "protocol": "transductive: adapt on unlabelled test images and evaluate on them; "
                                      "lambda of TA/TIES chosen on held-out validation images, never on test",
                          "seeds_vary": "AdaMerging's batches and every surgery's W_down init and batches; theta_0, "
                                        "the experts and the data splits are shared by all seeds (as the papers share "
                                        "one CLIP and its released experts), so zero-shot, experts and plain WA/TA/TIES "
                                        "have std 0 by construction",
                          "wall_seconds_per_run": [r["wall_seconds"] for r in raws]}
    print(f"\nzero-shot {100 * result['acc_zero_shot']['mean']:.1f}  experts {100 * result['acc_experts']['mean']:.1f} "
          f"(train {100 * result['acc_experts_train']['mean']:.1f})")
    print(f"{'merge':17s} {'plain':>11s} {'surgery':>11s} {'matched':>11s} {'v2':>11s} {'gap v1':>6s} {'gap v2':>6s}")
    for m in MERGES:
        cells = " ".join(f"{100 * result[k][m]['mean']:5.1f}+-{100 * result[k][m]['std']:3.1f}"
                         for k in ("acc_plain", "acc_surgery", "acc_surgery_matched", "acc_surgeryv2"))
        print(f"{m:17s} {cells} {result['gap_closed_surgery'][m]:6.2f} {result['gap_closed_surgeryv2'][m]:6.2f}")
    print("checks:", json.dumps(result["checks"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        stem = args.out.with_suffix("")
        result["figures"] = [Path(p).name for p in draw(result, raws, stem, list(MERGES), VARIANTS)]
        args.out.write_text(json.dumps(result, indent=1))
        stem.with_name(stem.name + "_raw.json").write_text(json.dumps(raws, indent=1))
        print(f"wrote {args.out}, {stem.name}_raw.json and {', '.join(result['figures'])}")


if __name__ == "__main__":
    main()
