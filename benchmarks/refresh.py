"""ER and DER++ with and without refresh learning on the CPU demo streams, side by side.

    python benchmarks/refresh.py --out benchmarks/results/refresh.json   # full (~8 min on 2 CPU cores)
    python benchmarks/refresh.py --quick                                 # smoke check (~1 min)

Streams: Split-MNIST-5k (5 tasks x 2 classes; 400 train / 100 test digits per class) and Split-digits
(5 x 2; sklearn's 8x8 digits, 36 test per class), mammoth's MNIST MLP (2 x 100), reservoir buffer of
200, batch and replay minibatch 32, SGD without momentum. Refresh runs the released code's variant
(per-tensor rescaled ascent on the current batch's CE, damped Fisher 1e-3, noise 1e-3, tau 1e-5).

Full mode first tunes on a validation split (``val_per_class`` training examples per class held out,
``eval_split: val``, seeds 100-102): the learning rate of each base learner, then refresh's delta at
that learning rate. The chosen settings then run on the test split with seeds 0-4. Reported per
method: final average class-IL and task-IL accuracy and class-IL forgetting (mammoth's formulas), mean
and standard deviation over seeds per stream, and the paired per-seed class-IL gain of refresh; the top-level entries average the two streams (the mean
of the per-stream means and of the per-stream standard deviations). ``step_time_ratio_refresh`` is the
mean wall time of a training step (unlearning included, the once-per-task Fisher pass excluded; the
whole-fit ratio is reported next to it) of DER++ + refresh over DER++ on Split-MNIST-5k: the median
over 5 back-to-back pairs of runs, because the load of the shared machine drifts.
"""

from __future__ import annotations

import argparse
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
from tqdm import tqdm  # noqa: E402

from callbacks.refresh import RefreshLearning  # noqa: E402
from datamodules.class_incremental import ClassIncrementalStream  # noqa: E402
from lit_modules.refresh import ContinualModule  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")

STREAMS = {
    "split_mnist5k": {"data": {"dataset": "mnist5k", "test_per_class": 100, "epochs_per_task": 3, "val_per_class": 50},
                      "model": {"image_size": 28}},
    "split_digits": {"data": {"dataset": "digits", "test_per_class": 36, "epochs_per_task": 5, "val_per_class": 20},
                     "model": {"image_size": 8}},
}
BASES = {"er": {"alpha": 0.0, "beta": 1.0}, "derpp": {"alpha": 0.1, "beta": 0.5}}
MODEL = {"backbone": "mlp", "width": 100, "in_channels": 1, "num_classes": 10, "buffer_size": 200,
         "minibatch_size": 32}
LR_GRID, DELTA_GRID = (0.03, 0.1, 0.3), (1e-5, 1e-4, 1e-3, 1e-2)
DEFAULT_LR, DEFAULT_DELTA = 0.1, 1e-5  # --quick (no tuning): the demo config's values
TUNE_SEEDS, TEST_SEEDS = (100, 101, 102), (0, 1, 2, 3, 4)


class StepTimer(L.Callback):
    """Wall time of every training step from before the unlearning to after the optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)


def run(stream: str, base: str, lr: float, delta: float | None, seed: int, split: str, epochs: int | None) -> dict:
    """One stream, one learner; ``delta=None`` is the base learner alone. Returns the summary and timings."""
    spec = STREAMS[stream]
    data = {**spec["data"], "eval_split": split, "stream_seed": seed, "batch_size": 32}
    if epochs:
        data["epochs_per_task"] = epochs
    if split == "test":
        data["val_per_class"] = 0
    L.seed_everything(seed, verbose=False)
    module = ContinualModule(**MODEL, **spec["model"], **BASES[base], lr=lr, seed=seed)
    timer = StepTimer()
    callbacks = [timer] + ([RefreshLearning(delta=delta, seed=seed)] if delta is not None else [])
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(module, ClassIncrementalStream(**data))
    summary = dict(module.results["summary"])
    summary["fit_seconds"] = time.perf_counter() - start
    summary["step_seconds"] = statistics.fmean(timer.times[5:] or timer.times)  # skip warm-up steps
    return summary


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def tune(streams: list[str], bar: tqdm, epochs: int | None) -> tuple[dict, dict]:
    """Validation-split search: lr per (stream, base), then delta per (stream, base) at that lr."""
    tried: dict = {}
    chosen: dict = {}
    for stream in streams:
        for base in BASES:
            scores = {}
            for lr in LR_GRID:
                scores[f"lr={lr}"] = statistics.fmean(
                    run(stream, base, lr, None, s, "val", epochs)["final_avg_acc_class_il"] for s in TUNE_SEEDS)
                bar.update(len(TUNE_SEEDS))
            lr = LR_GRID[max(range(len(LR_GRID)), key=lambda i: scores[f"lr={LR_GRID[i]}"])]
            for delta in DELTA_GRID:
                scores[f"lr={lr},delta={delta}"] = statistics.fmean(
                    run(stream, base, lr, delta, s, "val", epochs)["final_avg_acc_class_il"] for s in TUNE_SEEDS)
                bar.update(len(TUNE_SEEDS))
            delta = max(DELTA_GRID, key=lambda d: scores[f"lr={lr},delta={d}"])
            tried[f"{stream}/{base}"] = scores
            chosen[f"{stream}/{base}"] = {"lr": lr, "delta": delta}
    return tried, chosen


def step_time_ratio(lr: float, delta: float, pairs: int, bar: tqdm) -> dict:
    """DER++ and DER++ + refresh on Split-MNIST-5k (1 epoch per task), run alternately ``pairs`` times; on a
    shared machine the load drifts, so the ratio is the median of the ratios of back-to-back runs."""
    steps: dict[str, list[float]] = {"derpp": [], "derpp+refresh": []}
    for seed in range(pairs):
        for name, d in (("derpp", None), ("derpp+refresh", delta)):
            steps[name].append(run("split_mnist5k", "derpp", lr, d, seed, "test", 1)["step_seconds"])
            bar.update(1)
    ratios = [r / b for r, b in zip(steps["derpp+refresh"], steps["derpp"])]
    return {"ratio": statistics.median(ratios), "pair_ratios": ratios, "step_seconds": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch per task, no tuning (~1 min)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)  # timings comparable on a shared 2-core machine
    streams, seeds = list(STREAMS), TEST_SEEDS[:1] if args.quick else TEST_SEEDS
    epochs = 1 if args.quick else None
    tuning_runs = 0 if args.quick else len(streams) * len(BASES) * (len(LR_GRID) + len(DELTA_GRID)) * len(TUNE_SEEDS)
    pairs = 1 if args.quick else 5
    bar = tqdm(total=tuning_runs + len(streams) * len(BASES) * 2 * len(seeds) + 2 * pairs, desc="runs")
    if args.quick:
        tried = {}
        chosen = {f"{s}/{b}": {"lr": DEFAULT_LR, "delta": DEFAULT_DELTA} for s in streams for b in BASES}
    else:
        tried, chosen = tune(streams, bar, epochs)
    per_stream: dict = {}
    timing: dict = {}
    for stream in streams:
        rows: dict = {}
        for base in BASES:
            setting = chosen[f"{stream}/{base}"]
            for name, delta in ((base, None), (f"{base}+refresh", setting["delta"])):
                rows[name] = [run(stream, base, setting["lr"], delta, s, "test", epochs) for s in seeds]
                bar.update(len(seeds))
        per_stream[stream] = {
            key: {name: mean_std([r[metric] for r in runs]) for name, runs in rows.items()}
            for key, metric in (("class_il", "final_avg_acc_class_il"), ("task_il", "final_avg_acc_task_il"),
                                ("forgetting", "forgetting_class_il"))
        }
        # same seed = same initialisation, data order and buffer draws: the per-seed difference is paired
        per_stream[stream]["paired_gain_class_il"] = {
            base: mean_std([r["final_avg_acc_class_il"] - b["final_avg_acc_class_il"]
                            for r, b in zip(rows[f"{base}+refresh"], rows[base])]) for base in BASES}
        timing[stream] = {name: {"step_seconds": statistics.fmean(r["step_seconds"] for r in runs),
                                 "fit_seconds": statistics.fmean(r["fit_seconds"] for r in runs)}
                          for name, runs in rows.items()}
    mnist_derpp = chosen["split_mnist5k/derpp"]
    timed = step_time_ratio(mnist_derpp["lr"], mnist_derpp["delta"], pairs, bar)
    bar.close()
    methods = [m for b in BASES for m in (b, f"{b}+refresh")]
    result: dict = {
        key: {m: {"mean": statistics.fmean(per_stream[s][key][m]["mean"] for s in streams),
                  "std": statistics.fmean(per_stream[s][key][m]["std"] for s in streams)} for m in methods}
        for key in ("class_il", "task_il", "forgetting")
    }
    main_timing = timing["split_mnist5k"]
    result["step_time_ratio_refresh"] = timed["ratio"]
    result["step_time_pairs"] = timed
    result["fit_time_ratio_refresh"] = main_timing["derpp+refresh"]["fit_seconds"] / main_timing["derpp"]["fit_seconds"]
    gains = {b: result["class_il"][f"{b}+refresh"]["mean"] - result["class_il"][b]["mean"] for b in BASES}
    result["targets"] = {
        "refresh_gain_class_il_points": {b: 100 * g for b, g in gains.items()},
        "gain_ge_1_point_on_some_base": any(g >= 0.01 for g in gains.values()),
        "no_base_drops_more_than_0.5_point": all(g >= -0.005 for g in gains.values()),
        "step_time_ratio_le_2": result["step_time_ratio_refresh"] <= 2.0,
    }
    result.update({"streams": per_stream, "timing": timing, "chosen": chosen, "tuning_val_class_il": tried,
                   "settings": {"quick": args.quick, "test_seeds": list(seeds), "tune_seeds": [] if args.quick
                                else list(TUNE_SEEDS), "model": MODEL, "bases": BASES,
                                "streams": {k: v["data"] for k, v in STREAMS.items()}, "epochs_override": epochs}})
    print(f"\n{'stream':<15} {'method':<15} {'class-IL':>15} {'task-IL':>15} {'forgetting':>15} {'step ms':>8}")
    for stream in streams:
        for m in methods:
            cells = [f"{100 * per_stream[stream][k][m]['mean']:6.2f} ± {100 * per_stream[stream][k][m]['std']:5.2f}"
                     for k in ("class_il", "task_il", "forgetting")]
            print(f"{stream:<15} {m:<15} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} "
                  f"{1000 * timing[stream][m]['step_seconds']:8.2f}")
    for stream in streams:
        print(f"{stream}: paired class-IL gain of refresh (points, mean ± std over seeds): " + ", ".join(
            f"{b} {100 * g['mean']:+.2f} ± {100 * g['std']:.2f}" for b, g in per_stream[stream]["paired_gain_class_il"].items()))
    print(f"step time ratio (DER++ + refresh / DER++, Split-MNIST-5k, median of {pairs} back-to-back pairs): "
          f"{result['step_time_ratio_refresh']:.2f}; whole fit (accuracy runs): {result['fit_time_ratio_refresh']:.2f}")
    print("targets:", json.dumps(result["targets"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
