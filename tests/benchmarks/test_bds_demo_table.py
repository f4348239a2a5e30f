"""The `make demo-bds` table reads the newest version of each run's CSV log and the last value of each column."""

from __future__ import annotations

from pathlib import Path

from benchmarks.bds_demo import table


def write_metrics(run: Path, version: int, rows: list[str]) -> Path:
    folder = run / "csv" / f"version_{version}"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_table_reads_the_newest_version_and_last_logged_values(tmp_path: Path) -> None:
    header = "epoch,step,train/weight_auroc,train/weight_mean_benign,train/weight_mean_harmful,val/harmful_score,val/task_acc"
    write_metrics(tmp_path / "demo", 9, [header, "3,47,,,,0.9,0.1"])  # an earlier run: must not be read
    newest = write_metrics(tmp_path / "demo", 10, [header, "0,11,0.6,1.1,0.8,,", "3,47,0.75,1.2,0.5,,",
                                                   "3,47,,,,0.125,0.55"])
    (newest / "bds_weights.png").write_bytes(b"png")
    write_metrics(tmp_path / "demo_sft", 2, ["epoch,step,val/harmful_score,val/task_acc", "3,47,0.8,0.6"])
    lines = table(tmp_path).splitlines()
    bds = next(line for line in lines if line.startswith("| BDS (scalar) |"))
    # version_10 is newer than version_9 (numerically; as text it sorts first); each column keeps its last logged value
    assert bds == f"| BDS (scalar) | 0.125 | 0.550 | 0.500 | 1.200 | 0.750 | {newest / 'bds_weights.png'} |"
    assert "| SFT | 0.800 | 0.600 | - | - | - | - |" in lines
    assert "| mix | not run | | | | | |" in lines
