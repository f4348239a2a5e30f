"""The summary table of `make demo-bds`: one row per demo run, read from its newest CSV log.

    python benchmarks/bds_demo.py                      # after the stages of `make demo-bds`
    python benchmarks/bds_demo.py --aligned-adapter    # build (or find) the aligned start, print its folder

The aligned start is the benchmark's alignment stage (``benchmarks/bds.py``: cached under
``$LITZOO_CACHE/benchmarks/bds/aligned-<hash>``), here in float32 so that it trains quickly on any CPU.
Rows: the aligned model before fine-tuning, SFT (the attack), naive mixing, BDS with the scalar scheduler,
the neural scheduler trained jointly and the same neural scheduler applied frozen to a fresh mix. Columns:
harmful score and task accuracy on the validation fold of held-out prompts, and for the scheduler rows the
final mean weights of harmful and benign rows and the AUROC of -weight as a harmful-row detector. The
weights over training are drawn in each scheduler run's ``bds_weights.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUNS = {"aligned (no fine-tuning)": "demo_aligned", "SFT": "demo_sft", "mix": "demo_mix", "BDS (scalar)": "demo",
        "BDS (neural)": "demo_neural", "BDS (neural, frozen, new mix)": "demo_neural_transfer"}
COLUMNS = ("val/harmful_score", "val/task_acc", "train/weight_mean_harmful", "train/weight_mean_benign",
           "train/weight_auroc")


def newest_version(run: Path) -> Path | None:
    """The newest ``csv/version_N`` folder of a run (a rerun adds a version, never overwrites one)."""
    versions = [p for p in (run / "csv").glob("version_*") if (p / "metrics.csv").is_file()]
    return max(versions, key=lambda p: int(p.name.split("_")[1]), default=None)


def last_values(metrics: Path) -> dict[str, float]:
    """The last logged value of every column of a Lightning ``metrics.csv``."""
    out: dict[str, float] = {}
    with metrics.open() as handle:
        for row in csv.DictReader(handle):
            out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


def table(root: Path) -> str:
    """Markdown table of the demo runs found under ``root``; missing runs are listed as not run."""
    lines = ["| run | harmful score | task acc | weight harmful | weight benign | weight AUROC | figure |",
             "|---|---|---|---|---|---|---|"]
    for label, name in RUNS.items():
        version = newest_version(root / name)
        if version is None:
            lines.append(f"| {label} | not run | | | | | |")
            continue
        values = last_values(version / "metrics.csv")
        cells = [f"{values[c]:.3f}" if c in values else "-" for c in COLUMNS]
        png = version / "bds_weights.png"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {png if png.is_file() else '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "bds", help="folder holding the demo runs")
    parser.add_argument("--aligned-adapter", action="store_true", help="build or find the aligned start; print its folder")
    args = parser.parse_args()
    if args.aligned_adapter:
        from benchmarks.bds import aligned_adapter, build_parser

        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the folder only (the Makefile reads it)
            folder = aligned_adapter(build_parser().parse_args(["--dtype", "float32"]))
        print(folder)
        return
    print(table(args.root))


if __name__ == "__main__":
    main()
