"""ER and DER++ with refresh learning, with a random-direction control, on Split-MNIST-5k: 20 paired seeds.

    python benchmarks/refresh.py --out benchmarks/results/refresh.json   # full (~20 min on one free core)
    python benchmarks/refresh.py --quick                                 # smoke check (~2 min)

Stream (designed so that refresh has room to act): Split-MNIST-5k, 5 tasks x 2 classes, one fixed test
split (100 per class, ``split_seed=0``, the same for every seed), a reservoir buffer of only 50 images
(1.25 % of the 4000 training images; the paper's 500 of 50k is 1 %), 10 epochs per task of 8 batches of
32 (the epoch's batches are a fresh seeded draw from the task's 800 images), replay minibatch 32,
mammoth's MNIST MLP (2 x 100), SGD without momentum. Refresh is the released code's variant
(per-tensor rescaled ascent on the current batch's CE, damped Fisher 1e-3, noise 1e-3, tau 1e-5, the
Fisher on 200 examples of the finished task).

Protocol, fixed before the run:
1. delta by the move it makes, not by accuracy: one calibration run per base on the validation split
   (50 training images per class held out, ``eval_split=val``) measures the median ratio of the unlearning
   move to the SGD move (``lr x |grad|``) at ``CALIBRATION_DELTA``; the move is linear in delta, so delta is
   rescaled to a median ratio of ``TARGET_RATIO`` (3 %, inside 1-10 %) at that learning rate, and in
   proportion to the learning rate for the others.
2. Equal tuning budget: the base and base+refresh each try the same ``LR_GRID`` on the validation split
   with ``TUNE_SEEDS`` and keep their best learning rate; the control arm reuses refresh's settings.
3. Test: 20 seeds (model init, data order, buffer draws; ``stream_seed``) x 6 arms on the fixed test split.
   Paired difference of every refresh / control arm against its base: mean, 95 % CI half-width (Student
   t), Wilcoxon signed-rank p (``scipy.stats.wilcoxon``). Floor (SGD fine-tuning, no replay) and ceiling
   (joint training of all 10 classes, same number of steps) on the first 5 seeds give the protocol's
   validity (ceiling - floor) before any comparison.
Per-run outputs (accuracies, move ratios, preconditioner ranges, timings) go to ``<out>_raw.jsonl``.
Every run is also appended to ``--cache`` under a hash of its arguments, the stream/model/refresh
settings and the source of the code it runs (not this script's reporting), and reused from there.
``--seeds`` lowers the number of test seeds (the full design is 20) when the CPU budget runs short.
Accuracies are fractions in [0, 1]. No BatchNorm + crop CNN row: at this stream's step budget the small
CNN's joint-training ceiling is 45 % on validation (MLP 92 %), too close to its floor to show a 1-point
effect, and a ResNet row is beyond the CPU budget (docs/methods/refresh.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402
from tqdm import tqdm  # noqa: E402

from callbacks.refresh import RefreshLearning  # noqa: E402
from datamodules.class_incremental import ClassIncrementalStream  # noqa: E402
from lit_modules.refresh import ContinualModule  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")

DATA = {"dataset": "mnist5k", "classes_per_task": 2, "test_per_class": 100, "split_seed": 0, "batch_size": 32}
MODEL = {"backbone": "mlp", "width": 100, "in_channels": 1, "image_size": 28, "num_classes": 10,
         "buffer_size": 50, "minibatch_size": 32, "plot": False}
BASES = {"er": {"alpha": 0.0, "beta": 1.0}, "derpp": {"alpha": 0.1, "beta": 0.5}}
REFRESH = {"fisher_examples": 200, "track_moves": True}
FULL = {"epochs": 10, "batches": 8, "test_seeds": list(range(20)), "tune_seeds": [100, 101], "bound_seeds": 5}
QUICK = {"epochs": 2, "batches": 4, "test_seeds": [0, 1], "tune_seeds": [], "bound_seeds": 1}
LR_GRID, DEFAULT_LR = (0.03, 0.1), 0.1
CALIBRATION_DELTA, TARGET_RATIO, VAL_PER_CLASS, CALIBRATION_SEED = 1e-3, 0.03, 50, 99


def run(arm: str, lr: float, delta: float | None, seed: int, split: str, plan: dict) -> dict:
    """One learner on the stream. ``arm``: ``er``, ``derpp``, ``<base>+refresh``, ``<base>+control``,
    ``floor`` (SGD, no replay) or ``ceiling`` (joint training on all classes as one task)."""
    base, _, plug = arm.partition("+")
    data = {**DATA, "epochs_per_task": plan["epochs"], "stream_seed": seed, "eval_split": split,
            "val_per_class": VAL_PER_CLASS if split == "val" else 0}
    model = {**MODEL, **BASES.get(base, {}), "lr": lr, "seed": seed}
    if arm == "floor":
        model["buffer_size"] = 0
    if arm == "ceiling":  # one task of all classes, trained for as many steps as the whole stream
        data.update(classes_per_task=10, epochs_per_task=5 * plan["epochs"])
        model["buffer_size"] = 0
    callbacks = []
    if plug:
        callbacks.append(RefreshLearning(delta=delta, seed=seed, direction="random" if plug == "control" else "gradient",
                                         **REFRESH))
    L.seed_everything(seed, verbose=False)
    module = ContinualModule(**model)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        limit_train_batches=plan["batches"], check_val_every_n_epoch=data["epochs_per_task"],
                        log_every_n_steps=10**6, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(module, ClassIncrementalStream(**data))
    summary = module.results["summary"]
    out = {"arm": arm, "seed": seed, "split": split, "lr": lr, "delta": delta,
           "class_il": summary["final_avg_acc_class_il"], "task_il": summary["final_avg_acc_task_il"],
           "forgetting_class_il": summary.get("forgetting_class_il", float("nan")),
           "fit_seconds": time.perf_counter() - start}
    if plug:
        moves = callbacks[0].moves
        ratios = torch.stack([r for _, r in moves["ratio"]]).tolist()
        tasks = [t for t, _ in moves["ratio"]]
        out["move_ratio_median"] = statistics.median(ratios)
        out["move_ratio_per_task"] = [statistics.median(r for r, t in zip(ratios, tasks) if t == k)
                                      for k in sorted(set(tasks))]
        out["preconditioner_range"] = [[lo, hi] for _, lo, hi in moves["preconditioner"]]
    return out


SOURCES = ("callbacks/refresh.py", "lit_modules/refresh.py", "lit_modules/refresh_parts.py", "core/fisher.py",
           "core/rng.py", "core/buffer.py", "core/tensor_augment.py", "core/continual_metrics.py",
           "datamodules/class_incremental.py", "datamodules/sources")


def code_hash() -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        for path in sorted((REPO / name).rglob("*.py")) if (REPO / name).is_dir() else [REPO / name]:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run_key(arm: str, lr: float, delta: float | None, seed: int, split: str, plan: dict, code: str) -> str:
    """What produces a run: its arguments, the settings run() reads, and the code's source."""
    what = {"arm": arm, "lr": lr, "delta": delta, "seed": seed, "split": split, "epochs": plan["epochs"],
            "batches": plan["batches"], "data": DATA, "model": MODEL, "bases": BASES, "refresh": REFRESH,
            "val_per_class": VAL_PER_CLASS, "code": code}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


class Runner:
    """Runs (or reuses from the cache) and records every run (raw JSONL), with a progress bar."""

    def __init__(self, plan: dict, raw: Path | None, total: int, cache: Path) -> None:
        self.plan, self.raw, self.bar, self.cache, self.code = plan, raw, tqdm(total=total, desc="runs"), cache, code_hash()
        self.cached = {}
        if cache.is_file():
            self.cached = {row["key"]: row for row in map(json.loads, cache.read_text().splitlines())}
        cache.parent.mkdir(parents=True, exist_ok=True)
        if raw:
            raw.parent.mkdir(parents=True, exist_ok=True)
            raw.write_text("")

    def __call__(self, stage: str, arm: str, lr: float, delta: float | None, seed: int, split: str) -> dict:
        key = run_key(arm, lr, delta, seed, split, self.plan, self.code)
        if key in self.cached:
            out = {**self.cached[key], "stage": stage}
        else:
            out = {"stage": stage, "key": key, **run(arm, lr, delta, seed, split, self.plan)}
            with self.cache.open("a") as f:
                f.write(json.dumps(out) + "\n")
        if self.raw:
            with self.raw.open("a") as f:
                f.write(json.dumps(out) + "\n")
        self.bar.update(1)
        return out


def calibrate(runner: Runner, bases: list[str]) -> dict:
    """delta per base at ``DEFAULT_LR`` giving a median unlearning/SGD move ratio of ``TARGET_RATIO``."""
    found = {}
    for base in bases:
        probe = runner("calibration", f"{base}+refresh", DEFAULT_LR, CALIBRATION_DELTA, CALIBRATION_SEED, "val")
        found[base] = {"probe_delta": CALIBRATION_DELTA, "probe_move_ratio": probe["move_ratio_median"],
                       "delta_at_lr": CALIBRATION_DELTA * TARGET_RATIO / probe["move_ratio_median"],
                       "lr": DEFAULT_LR}
    return found


def delta_for(calibration: dict, base: str, lr: float) -> float:
    """The move ratio is ~ delta / lr (the rescaled ascent does not scale with the gradient)."""
    return calibration[base]["delta_at_lr"] * lr / calibration[base]["lr"]


def tune(runner: Runner, calibration: dict, bases: list[str]) -> tuple[dict, dict]:
    """Same lr grid and seeds for the base and for base+refresh; best mean validation class-IL each."""
    tried, chosen = {}, {}
    for base in bases:
        for arm in (base, f"{base}+refresh"):
            scores = {}
            for lr in LR_GRID:
                delta = delta_for(calibration, base, lr) if "+" in arm else None
                scores[lr] = statistics.fmean(runner("tune", arm, lr, delta, s, "val")["class_il"]
                                              for s in runner.plan["tune_seeds"])
            lr = max(LR_GRID, key=scores.get)
            tried[arm] = {str(k): v for k, v in scores.items()}
            chosen[arm] = {"lr": lr, "delta": delta_for(calibration, base, lr) if "+" in arm else None}
        chosen[f"{base}+control"] = chosen[f"{base}+refresh"]
    return tried, chosen


def ci95(values: list[float]) -> float:
    """Half-width of the Student-t 95 % confidence interval of the mean."""
    n = len(values)
    return float(stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / n**0.5) if n > 1 else float("nan")


def paired(arm: list[dict], base: list[dict]) -> dict:
    diffs = [a["class_il"] - b["class_il"] for a, b in zip(arm, base)]
    nonzero = any(abs(d) > 0 for d in diffs)
    p = float(stats.wilcoxon(diffs).pvalue) if len(diffs) > 1 and nonzero else float("nan")
    return {"mean": statistics.fmean(diffs), "ci95": ci95(diffs), "wilcoxon_p": p, "per_seed": diffs}


def summarise(rows: list[dict], key: str = "class_il") -> dict:
    values = [r[key] for r in rows]
    return {"mean": statistics.fmean(values), "ci95": ci95(values), "per_seed": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 2 epochs x 4 batches per task, no tuning")
    parser.add_argument("--out", type=Path, help="write the results as JSON (raw runs next to it, *_raw.jsonl)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: comparable timings)")
    parser.add_argument("--bases", nargs="+", choices=list(BASES), default=list(BASES), help="base learners to run")
    parser.add_argument("--seeds", type=int, help="test seeds 0..N-1 (default: the plan's, 20 in full mode)")
    parser.add_argument("--cache", type=Path, default=REPO / "runs/refresh/benchmark_cache.jsonl",
                        help="JSONL of finished runs keyed by what produced them")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plan = dict(QUICK if args.quick else FULL)
    if args.seeds:
        plan["test_seeds"] = list(range(args.seeds))
    bases = args.bases
    arms = [a for b in bases for a in (b, f"{b}+refresh", f"{b}+control")]
    total = (len(bases) + (0 if args.quick else 2 * len(bases) * len(LR_GRID) * len(plan["tune_seeds"]))
             + len(arms) * len(plan["test_seeds"]) + 2 * plan["bound_seeds"])
    raw = args.out.with_name(args.out.stem + "_raw.jsonl") if args.out else None
    runner = Runner(plan, raw, total, args.cache)
    start = time.perf_counter()
    calibration = calibrate(runner, bases)
    if args.quick:
        tried = {}
        chosen = {a: {"lr": DEFAULT_LR, "delta": delta_for(calibration, a.split("+")[0], DEFAULT_LR) if "+" in a
                      else None} for a in arms}
    else:
        tried, chosen = tune(runner, calibration, bases)
    bound_seeds = plan["test_seeds"][: plan["bound_seeds"]]
    bounds = {arm: [runner("bounds", arm, DEFAULT_LR, None, s, "test") for s in bound_seeds]
              for arm in ("floor", "ceiling")}
    results = {arm: [runner("test", arm, chosen[arm]["lr"], chosen[arm]["delta"], s, "test")
                     for s in plan["test_seeds"]] for arm in arms}
    runner.bar.close()
    plugged = [a for a in arms if "+" in a]
    ratios = {a: statistics.median(r["move_ratio_median"] for r in results[a]) for a in plugged}
    diffs = {a: paired(results[a], results[a.split("+")[0]]) for a in plugged}
    validity = statistics.fmean(r["class_il"] for r in bounds["ceiling"]) - statistics.fmean(
        r["class_il"] for r in bounds["floor"])
    gains = {b: diffs[f"{b}+refresh"] for b in bases}
    result = {
        "protocol_validity": {"ceiling_minus_floor_class_il": validity,
                              **{a: summarise(rows) for a, rows in bounds.items()}},
        "class_il": {a: summarise(results[a]) for a in arms},
        "task_il": {a: summarise(results[a], "task_il") for a in arms},
        "forgetting_class_il": {a: summarise(results[a], "forgetting_class_il") for a in arms},
        "paired_diff": diffs,
        "move_ratio": {a: {"median": ratios[a], "per_task_median": [
            statistics.median(r["move_ratio_per_task"][k] for r in results[a])
            for k in range(len(results[a][0]["move_ratio_per_task"]))]} for a in plugged},
        "preconditioner_range": {a: {"after_task": [
            [min(r["preconditioner_range"][k][0] for r in results[a]), max(r["preconditioner_range"][k][1]
                                                                          for r in results[a])]
            for k in range(len(results[a][0]["preconditioner_range"]))]} for a in plugged},
        "targets": {
            "paired_ci95_le_0.0075": {b: g["ci95"] <= 0.0075 for b, g in gains.items()},
            "gain_ge_0.01_with_ci_above_0": {b: g["mean"] >= 0.01 and g["mean"] - g["ci95"] > 0
                                             for b, g in gains.items()},
            "refresh_above_control": {b: g["mean"] > diffs[f"{b}+control"]["mean"] for b, g in gains.items()},
        },
        "fit_seconds": {a: statistics.fmean(r["fit_seconds"] for r in results[a]) for a in arms},
        "calibration": calibration, "chosen": chosen, "tuning_val_class_il": tried,
        "settings": {"quick": args.quick, "plan": plan, "data": DATA, "model": MODEL,
                     "bases": {b: BASES[b] for b in bases},
                     "refresh": REFRESH, "lr_grid": list(LR_GRID), "target_move_ratio": TARGET_RATIO,
                     "val_per_class": VAL_PER_CLASS, "threads": args.threads},
        "wall_seconds": time.perf_counter() - start,
    }
    print(f"\nprotocol validity (ceiling - floor, class-IL): {validity:.4f}")
    print(f"{'arm':<16} {'class-IL':>16} {'paired diff':>18} {'wilcoxon p':>10} {'move ratio':>10}")
    for a in arms:
        c = result["class_il"][a]
        d = f"{diffs[a]['mean']:+.4f} ± {diffs[a]['ci95']:.4f}" if a in diffs else ""
        p = f"{diffs[a]['wilcoxon_p']:.3f}" if a in diffs else ""
        m = f"{ratios[a]:.3f}" if a in ratios else ""
        print(f"{a:<16} {c['mean']:.4f} ± {c['ci95']:.4f} {d:>18} {p:>10} {m:>10}")
    print("targets:", json.dumps(result["targets"]))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
