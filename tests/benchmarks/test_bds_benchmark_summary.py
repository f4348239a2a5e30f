"""The bds benchmark's length detector and its per-ratio summary over seeds."""

from __future__ import annotations

import argparse

import torch

from benchmarks.bds import ROWS, separation, summarise


def test_separation_scores_token_counts_in_either_direction() -> None:
    sources = torch.tensor([0, 0, 0, 1, 1, 1])
    longer_is_harmful = torch.tensor([40.0, 41.0, 42.0, 48.0, 49.0, 50.0])
    # unscaled, binary_auroc would take these counts for logits whose sigmoids all round to 1: AUROC 0.5
    assert separation(longer_is_harmful, sources) == 1.0
    assert separation(longer_is_harmful.flip(0), sources) == 1.0  # shorter = harmful is as strong a detector
    assert separation(torch.tensor([40.0, 50.0, 45.0, 45.0, 40.0, 50.0]), sources) == 0.5


def _seed(harmful_bds: float, length_auroc: float) -> dict:
    rows = {row: {"harmful_score": 0.5, "task_acc": 0.6, "over_refusal": 0.0} for row in ROWS}
    rows["bds"] = {**rows["bds"], "harmful_score": harmful_bds}
    for row in ("bds", "bds_ref"):
        rows[row] |= {"weight_auroc_applied": 0.7, "weight_auroc_final": 0.8}
    ratio = {**rows, "loss_auroc_aligned": 1.0, "length_auroc_prompt": length_auroc,
             "length_auroc_response": 0.55, "scheduler_lr": 0.4}
    return {"0.3": ratio, "steps": {"mix": [1.0, 1.0], "bds": [1.5], "bds_ref": [2.0]}}


def test_summary_reports_seed_means_of_every_row_and_detector() -> None:
    args = argparse.Namespace(ratios=[0.3])
    judge = {"accuracy": 0.97, "confusion": {}, "n": 158}
    result = summarise(args, [_seed(0.1, 0.6), _seed(0.3, 0.7)], judge)
    entry = result["by_ratio"]["0.3"]
    assert entry["harmful_score_bds"] == {"mean": 0.2, "std": round(0.02**0.5, 4)}
    assert entry["length_auroc_prompt"]["mean"] == 0.65 and entry["length_auroc_response"]["mean"] == 0.55
    assert entry["attack_gain"] == {"mean": 0.0, "std": 0.0}  # sft and clean agree in these fake seeds
    assert result["step_time_ratio_bds_vs_mix"] == 1.5
    assert result["targets"]["p=0.3"]["bds<=mix"] and not result["targets"]["p=0.3"]["attack_gain>=0.3"]
