"""The tgr benchmark's merge and paired summary: per-episode differences stay aligned across seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.tgr import ROWS, merge


def _run(folder: Path, seed: int, scores: dict[str, list[float]]) -> Path:
    """A per-seed raw file (single zoo, 5-shot only) and the summary JSON that merge reads beside it."""
    rows = {"single": {row: {"5": {"protonet": v, "maml": v[:1]}} for row, v in scores.items()}}
    raw = folder / f"s{seed}" / "tgr_raw.json"
    raw.parent.mkdir(parents=True)
    raw.write_text(json.dumps({"config": {"seed": seed}, "training": {}, "rows": rows}))
    summary = {"quick": True, "wall_seconds": 1.0, "config": {"seed": seed}, "similarity_speedup": 1.0,
               "similarity_seconds": 1.0, "similarity_loop_seconds": 1.0, "similarity_n": 2,
               "similarity_max_abs_diff": 0.0, "teacher_accuracy_mean": {}, "alpha": 0.0}
    (raw.parent / "tgr.json").write_text(json.dumps(summary))
    return raw


def test_paired_differences_pair_each_seeds_episodes_and_keep_the_seed_means(tmp_path: Path) -> None:
    seed0 = {row: [0.2, 0.4, 0.6] for row in ROWS} | {"tgr": [0.4, 0.4, 0.9]}
    seed1 = {row: [0.8, 0.2] for row in ROWS} | {"tgr": [0.6, 0.2]}
    paths = [_run(tmp_path, 0, seed0), _run(tmp_path, 1, seed1)]
    result = merge(paths, tmp_path / "merged" / "tgr.json")
    vs_alpha0 = result["paired_5shot"]["single"]["alpha0"]
    diffs = [0.2, 0.0, 0.3, -0.2, 0.0]  # episode by episode, seed 0 then seed 1
    mean = sum(diffs) / len(diffs)
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / len(diffs))
    assert math.isclose(vs_alpha0["mean"], mean, abs_tol=1e-6)
    assert math.isclose(vs_alpha0["ci95"], 1.96 * std / math.sqrt(len(diffs)), abs_tol=1e-6)
    assert [round(d, 6) for d in vs_alpha0["seed_means"]] == [round(0.5 / 3, 6), -0.1]
    assert set(result["paired_5shot"]["single"]) == set(ROWS) - {"tgr"}
