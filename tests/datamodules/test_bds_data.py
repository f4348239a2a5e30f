"""BDSDataModule: disjoint prompt splits, exact / binomial mixing, masked labels, indices and sources."""

from __future__ import annotations

import pytest

from datamodules.bds import SOURCE_HARMFUL, BDSDataModule, mix
from datamodules.bds_tasks import arithmetic_problem

KW = dict(tokenizer="gpt2", prompt_format="plain", num_finetune=40, num_alignment=30, num_eval_harmful=20,
          num_eval_task=10, batch_size=8, shuffle=False)


def test_demo_splits_are_disjoint_and_mixed_exactly() -> None:
    dm = BDSDataModule(harmful_ratio=0.25, **KW)
    dm.setup("fit")
    ft, align = dm.raw["ft"], dm.raw["align"]
    harmful_ft = {r["instruction"] for r in ft if r["source"] == SOURCE_HARMFUL}
    assert len(harmful_ft) == 10 and dm.num_finetune_samples == 40
    align_prompts = {r["instruction"] for r in align}
    eval_prompts = {r["instruction"] for r in dm.raw["eval_harmful"]}
    assert not harmful_ft & align_prompts and not harmful_ft & eval_prompts and not align_prompts & eval_prompts
    task_train = {r["instruction"] for r in ft if r["source"] != SOURCE_HARMFUL}
    assert not task_train & {r["instruction"] for r in dm.raw["eval_task"]}
    assert all(r["output"].startswith(("I'm sorry", "I cannot", "I won't")) for r in align)


def test_batches_carry_indices_sources_and_masked_labels() -> None:
    dm = BDSDataModule(harmful_ratio=0.5, **KW)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    ft = batches[0][0]["ft"]
    assert ft["index"].tolist() == list(range(8))
    assert ft["source"].tolist() == [r["source"] for r in dm.raw["ft"][:8]]
    row = dm.splits["ft"][0]
    labels = ft["labels"][0]
    assert (labels[: row["prompt_len"]] == -100).all() and (labels[row["prompt_len"] : len(row["input_ids"])] >= 0).all()
    assert len(batches) == 5 and {"align", "ft"} == set(batches[0][0])
    prompt = dm.tokenizer.decode(ft["input_ids"][0][: row["prompt_len"]])
    assert prompt.startswith("Question: ") and prompt.endswith("Answer: ")
    evaluation = next(iter(dm.val_dataloader()[1]))
    assert evaluation["kind"] == "task" and (evaluation["attention_mask"][:, -1] == 1).all()  # left padding


def test_binomial_mixing_draws_the_count_and_errors() -> None:
    benign = [{"instruction": f"b{i}", "output": "x"} for i in range(100)]
    harmful = [{"instruction": f"h{i}", "output": "y"} for i in range(100)]
    counts = [sum(r["source"] for r in mix(benign, harmful, 100, 0.3, "binomial", seed)) for seed in range(5)]
    assert len(set(counts)) > 1 and all(15 <= c <= 45 for c in counts)
    assert sum(r["source"] for r in mix(benign, harmful, 100, 0.3, "exact", 0)) == 30
    with pytest.raises(ValueError, match="lower data.init_args.num_finetune"):
        mix(benign, harmful[:5], 100, 0.3, "exact", 0)


def test_rows_longer_than_max_length_leave_a_clear_error() -> None:
    with pytest.raises(ValueError, match="every fine-tuning row is longer than data.init_args.max_length"):
        BDSDataModule(harmful_ratio=0.25, **{**KW, "max_length": 4}).setup("fit")


def test_arithmetic_answers_are_exact() -> None:
    import random

    rng = random.Random(0)
    for _ in range(50):
        row = arithmetic_problem(rng)
        for step in row["output"].split("Step ")[1:-1]:  # the working and the check, if any, are true equations
            left, right = step.split(": ", 1)[1].rstrip(". ").replace("Check: ", "").replace("x", "*").split("=")
            assert eval(left) == int(right)  # noqa: S307 - digits and + - * / only
        assert row["output"].split("Step 1: ")[1].split("=")[1].split(".")[0].strip() == row["gold"]
        assert row["output"].endswith(f"The final answer is: {row['gold']}")


def test_neither_prompt_nor_answer_length_gives_the_harmful_rows_away() -> None:
    """Item 3 of the bds issue: length ranges overlap, so length alone is a weak detector (it ranked the
    harmful rows with AUROC 1.00 by prompt and 0.89 by answer before the phrasings and step counts varied)."""
    from sklearn.metrics import roc_auc_score

    dm = BDSDataModule(harmful_ratio=0.3, **{**KW, "num_finetune": 96, "prompt_format": "chat", "tokenizer": "smollm2"})
    dm.setup("fit")
    items = dm.splits["ft"].items
    sources = [r["source"] for r in items]
    for length in ([r["prompt_len"] for r in items], [len(r["input_ids"]) - r["prompt_len"] for r in items]):
        auroc = roc_auc_score(sources, length)
        assert 0.25 < auroc < 0.75, auroc


def test_subset_alignment_stage_and_fixed_held_out_split(tmp_path) -> None:
    import json

    full = BDSDataModule(harmful_ratio=0.25, **KW)
    full.setup("fit")
    keep = [i for i, r in enumerate(full.raw["ft"]) if r["source"] == 0]
    oracle = BDSDataModule(harmful_ratio=0.25, finetune_subset=keep, **KW)
    assert oracle.num_finetune_samples == 30 and all(r["source"] == 0 for r in oracle.raw["ft"])
    other_seed = BDSDataModule(harmful_ratio=0.25, **{**KW, "seed": 7})
    other_seed.setup("fit")
    held_out = {r["instruction"] for r in full.raw["eval_harmful"]}
    assert held_out == {r["instruction"] for r in other_seed.raw["eval_harmful"]}  # the split ignores the seed
    trained = {r["instruction"] for dm in (full, other_seed) for r in dm.raw["ft"] + dm.raw["align"]}
    assert not held_out & trained
    fold = BDSDataModule(harmful_ratio=0.25, eval_offset=20, **KW)
    fold.setup("fit")
    assert not held_out & {r["instruction"] for r in fold.raw["eval_harmful"]}
    helpful = tmp_path / "helpful.json"
    helpful.write_text(json.dumps([{"instruction": "Name a colour.", "output": "Blue."}]))
    stage = BDSDataModule(stage="alignment", helpful_file=str(helpful), **KW)
    stage.setup("fit")
    assert stage.num_finetune_samples == 31 and stage.raw["ft"][-1]["output"] == "Blue."
    with pytest.raises(ValueError, match="data.init_args.finetune_subset"):
        BDSDataModule(finetune_subset=[99], **KW).setup("fit")


def test_a_smaller_alignment_set_is_a_prefix_and_leaves_the_fine_tuning_rows_alone() -> None:
    from datamodules.bds_tasks import ALIGNMENT_POOL

    sets = {n: BDSDataModule(harmful_ratio=0.3, **{**KW, "num_alignment": n}) for n in (4, ALIGNMENT_POOL, 60)}
    for dm in sets.values():
        dm.setup("fit")
    small, pooled, large = (sets[n].raw for n in (4, ALIGNMENT_POOL, 60))
    assert small["ft"] == pooled["ft"] and small["align"] == pooled["align"][:4]  # a weaker defender, same user data
    assert large["align"][:ALIGNMENT_POOL] == pooled["align"]
    harmful = {r["instruction"] for r in large["ft"] if r["source"] == SOURCE_HARMFUL}
    assert not harmful & {r["instruction"] for r in large["align"]}  # beyond the pool the draw moves on, still disjoint
