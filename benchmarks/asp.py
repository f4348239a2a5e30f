"""ASP against its baselines on the offline glyph FSCIL stream, every number measured in this process.

Stage 1 pre-trains the small ViT with ``configs/asp/demo_pretrain.yaml`` (cached under ``--cache``, keyed by
a hash of the config, the overrides and the stage's source files). Stage 2 runs every row through
``configs/asp/demo.yaml`` plus its overlay, for each seed (model init and ``stream_seed``, i.e. the test
split and the 5 shots per class): 60 base glyph classes, then 8 sessions of 5-way 5-shot.

Rows: ``asp``; the baselines ``simplecil`` (frozen prototypes), ``vpt`` (VPT-Deep + prototypes), ``l2p``
(prompt pool + prototypes), ``no_anchor``, ``no_kl``; protocol rows ``floor`` (SimpleCIL on the randomly
initialised ViT: what the stream gives without pre-training) and ``ceiling`` (SimpleCIL with all 20
training images of every incremental class instead of 5). No hyper-parameter is tuned: all are the
release's (exps/cifar.json) or the demo's, so no test number feeds back into a setting.

    OMP_NUM_THREADS=1 python benchmarks/asp.py --out benchmarks/results/asp.json   # full, 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/asp.py --quick --out /tmp/asp_quick.json   # smoke run (~2 min)

JSON keys (fractions): ``sessions[row]`` (per session ``{mean, std}``), ``avg[row]``, ``pd[row]``, ``hm[row]``,
``old[row]`` / ``new[row]`` (last session), ``cost`` (base-session seconds per step, ASP over VPT-Deep,
evaluation images/s), ``protocol_validity`` (ceiling - floor average accuracy), ``targets`` (the issue's
criteria), ``settings``, ``wall_seconds``. Raw per-seed outputs go to ``<out stem>_raw.json``.
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
from tqdm import tqdm  # noqa: E402

import train  # noqa: E402
from core.fscil import save_session_curves  # noqa: E402

CONFIGS = REPO / "configs" / "asp"
ROWS: dict[str, list[str]] = {  # row -> overlay configs and overrides on top of demo.yaml
    "simplecil": ["--config", str(CONFIGS / "simplecil.yaml")],
    "vpt": ["--config", str(CONFIGS / "vpt.yaml")],
    "l2p": ["--config", str(CONFIGS / "l2p.yaml")],
    "asp": [],
    "no_anchor": ["--config", str(CONFIGS / "no_anchor.yaml")],
    "no_kl": ["--config", str(CONFIGS / "no_kl.yaml")],
    "floor": ["--config", str(CONFIGS / "simplecil.yaml"), "--model.init_args.backbone_checkpoint=null"],
    "ceiling": ["--config", str(CONFIGS / "simplecil.yaml"), "--data.init_args.shots=null"],
}
PROMPT_BASELINES = ("vpt", "l2p", "no_anchor", "no_kl")
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.enable_checkpointing=false"]


class Timer(L.Callback):
    """Wall time of the base session's optimisation steps (the epoch-start anchor passes excluded) and of the
    last evaluation (every test image of every class, after the last session)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.eval_seconds = 0.0
        self._start = 0.0

    def on_validation_epoch_start(self, trainer: L.Trainer, *args: object) -> None:
        self._start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.eval_seconds = time.perf_counter() - self._start

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.datamodule.task_of_epoch(trainer.current_epoch) == 0:
            self.seconds.append(time.perf_counter() - self._start)


def stage_hash(args: list[str], files: list[Path]) -> str:
    digest = hashlib.sha256(json.dumps(args).encode())
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def pretrain(cache: Path, quick: bool) -> Path:
    """The backbone of stage 1, reused when the config, overrides and code that produce it are unchanged."""
    overrides = ["--trainer.max_epochs=1", "--data.init_args.glyph_per_class=30"] if quick else []
    sources = [CONFIGS / "demo_pretrain.yaml", REPO / "lit_modules" / "asp_pretrain.py",
               REPO / "datamodules" / "asp_pretrain.py", REPO / "datamodules" / "sources" / "glyphs.py",
               REPO / "datamodules" / "sources" / "glyph_classes.py", REPO / "datamodules" / "sources" / "glyph_fonts.py"]
    path = cache / f"backbone-{stage_hash(overrides, sources)}.safetensors"
    if not path.is_file():
        train.cli_main(["fit", "--config", str(CONFIGS / "demo_pretrain.yaml"), *QUIET, *overrides,
                        f"--trainer.default_root_dir={cache / 'pretrain'}", f"--model.init_args.export_path={path}"])
    return path


def run_row(row: str, seed: int, backbone: Path, work: Path, quick: bool) -> dict:
    args = ["--config", str(CONFIGS / "demo.yaml"), *ROWS[row], *QUIET, f"--seed_everything={seed}",
            f"--data.init_args.stream_seed={2024 + seed}", f"--trainer.default_root_dir={work / row / str(seed)}",
            "--model.init_args.plot=false"]
    if row != "floor":
        args.append(f"--model.init_args.backbone_checkpoint={backbone}")
    if quick:
        args += ["--data.init_args.epochs_per_task=[1,1,1,1,1,1,1,1,1]", "--trainer.limit_train_batches=4",
                 "--data.init_args.glyph_per_class=12", "--data.init_args.test_per_class=2"]
    cli = train.cli_main(args, run=False)
    timer = Timer()
    cli.trainer.callbacks.append(timer)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    fit_seconds = time.perf_counter() - start
    metrics = cli.model.session_metrics()
    images = float(cli.model.history["count"].sum())
    return {**metrics, "fit_seconds": fit_seconds, "step_seconds": statistics.fmean(timer.seconds or [float("nan")]),
            "eval_images_per_second": images / timer.eval_seconds}


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def summarise(raw: dict[str, list[dict]]) -> dict:
    out: dict = {key: {} for key in ("sessions", "avg", "pd", "hm", "old", "new")}
    for row, runs in raw.items():
        out["sessions"][row] = [mean_std([r["sessions"][s] for r in runs]) for s in range(len(runs[0]["sessions"]))]
        for key in ("avg", "pd", "hm"):
            out[key][row] = mean_std([r[key] for r in runs])
        out["old"][row] = mean_std([r["old"][-1] for r in runs])
        out["new"][row] = mean_std([r["new"][-1] for r in runs])
    step = {row: statistics.fmean(r["step_seconds"] for r in raw[row]) for row in ("asp", "vpt")}
    out["cost"] = {"base_step_seconds": step, "asp_over_vpt_step_time": step["asp"] / step["vpt"],
                   "eval_images_per_second": {row: statistics.fmean(r["eval_images_per_second"] for r in runs)
                                              for row, runs in raw.items()}}
    out["protocol_validity"] = out["avg"]["ceiling"]["mean"] - out["avg"]["floor"]["mean"]
    asp, simple = out["sessions"]["asp"], out["sessions"]["simplecil"]
    out["targets"] = {
        "asp_above_simplecil_every_session": all(a["mean"] > s["mean"] for a, s in zip(asp, simple)),
        "asp_above_prompt_baselines_last_and_avg": all(
            asp[-1]["mean"] > out["sessions"][b][-1]["mean"] and out["avg"]["asp"]["mean"] > out["avg"][b]["mean"]
            for b in PROMPT_BASELINES),
        "asp_pd_within_simplecil_plus_1pt": out["pd"]["asp"]["mean"] <= out["pd"]["simplecil"]["mean"] + 0.01,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 base epoch of 4 batches: a smoke run")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "asp.json")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "asp" / "bench_cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    seeds = list(range(1 if args.quick else args.seeds))
    backbone = pretrain(args.cache, args.quick)
    work = args.cache / ("quick" if args.quick else "full")
    raw: dict[str, list[dict]] = {row: [] for row in ROWS}
    for seed in seeds:
        for row in tqdm(ROWS, desc=f"seed {seed}"):
            raw[row].append(run_row(row, seed, backbone, work, args.quick))
    result = {**summarise(raw), "wall_seconds": time.perf_counter() - start,
              "settings": {"quick": args.quick, "seeds": seeds, "threads": args.threads, "backbone": backbone.name,
                           "stream": "glyphs fscil: 60 base (20 train / 6 test per class) + 8 x 5-way 5-shot",
                           "rows": {row: " ".join(ROWS[row]).replace(str(CONFIGS) + "/", "") for row in ROWS}}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_name(args.out.stem + "_raw.json").write_text(json.dumps(raw, indent=1))
    curves = {row: [s["mean"] for s in result["sessions"][row]] for row in ROWS}
    save_session_curves(curves, args.out.with_name(args.out.stem + "_sessions.png"), "glyph FSCIL, mean over seeds")
    print(f"{'row':10} {'last':>6} {'avg':>6} {'pd':>6} {'hm':>6}")
    for row in ROWS:
        print(f"{row:10} {100 * result['sessions'][row][-1]['mean']:6.1f} {100 * result['avg'][row]['mean']:6.1f} "
              f"{100 * result['pd'][row]['mean']:6.1f} {100 * result['hm'][row]['mean']:6.1f}")
    print(json.dumps({k: result[k] for k in ("cost", "protocol_validity", "targets", "wall_seconds")}, indent=1))


if __name__ == "__main__":
    main()
