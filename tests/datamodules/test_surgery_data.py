"""SurgeryDataModule: offline demo tasks, unlabelled adaptation batches with task ids, clear errors."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader

from datamodules.sources import glyph_splits, mnist5k
from datamodules.surgery import SurgeryDataModule
from datamodules.surgery_tasks import DEMO_EXPERT_TASKS, GLYPH_TASKS, demo_task


def test_demo_tasks_have_distinct_label_spaces_and_disjoint_mnist_halves() -> None:
    tasks = {t: demo_task(t) for t in ("broad", *DEMO_EXPERT_TASKS)}
    classes = {t: int(d["train"][1].max()) + 1 for t, d in tasks.items()}
    assert classes == {"broad": 100, "glyphs_a": 12, "glyphs_b": 12, "glyphs_c": 10, "rotation": 4,
                       "digits": 10}
    assert all(len(d["test"][1]) >= 300 for d in tasks.values())
    images, _ = mnist5k()
    flat = torch.nn.functional.interpolate(images, size=32, mode="bilinear", antialias=True).clamp(0, 1).flatten(1)
    digits, rotated = demo_task("mnist"), demo_task("rotation")
    assert sum(len(digits[split][0]) for split in ("train", "val", "test")) == 2500
    # rotation 0 images are unrotated MNIST digits, and none of them is in the digit-class half
    upright = rotated["test"][0][rotated["test"][1] == 0].flatten(1)
    half = torch.cat([digits[split][0] for split in ("train", "val", "test")]).flatten(1)
    assert torch.cdist(upright[:20], flat).min(1).values.max() < 0.05
    assert torch.cdist(upright[:20], half).min(1).values.min() > 1.0


def test_expert_glyph_classes_are_disjoint_from_theta0_pre_training() -> None:
    splits = glyph_splits(0)
    used = [c for split, first, last in GLYPH_TASKS.values() for c in splits[split][first:last]]
    assert len(used) == len(set(used)) == 44 and not set(used) & set(splits["meta_train"])


def test_adapt_stage_serves_unlabelled_batches_of_every_task_and_labelled_eval() -> None:
    dm = SurgeryDataModule(tasks=["digits", "lfw"], batch_size=4, eval_batch_size=8)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader, CombinedLoader)
    batch, _, _ = next(iter(loader))
    assert set(batch) == {"digits", "lfw"}
    for task, part in batch.items():
        assert "label" not in part and part["task"] == [task] * 4 and part["image"].shape == (4, 1, 32, 32)
    evals = dm.val_dataloader()
    assert [next(iter(d))["task"][0] for d in evals] == ["digits", "lfw"]
    assert "label" in next(iter(evals[1])) and len(evals[1].dataset) == 80


def test_bad_data_config_names_the_key(tmp_path) -> None:
    with pytest.raises(ValueError, match="stage 'finetune' trains one task"):
        SurgeryDataModule(tasks=["digits", "lfw"], stage="finetune")
    with pytest.raises(ValueError, match="distinct task names"):
        SurgeryDataModule(tasks=["lfw", "lfw"])
    with pytest.raises(FileNotFoundError, match="data.init_args.root: no task folders"):
        SurgeryDataModule(tasks=["SUN397"], root=str(tmp_path / "nowhere"))
    (tmp_path / "SUN397").mkdir()
    dm = SurgeryDataModule(tasks=["SUN397"], root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="SUN397/train"):
        dm.setup()
    with pytest.raises(ValueError, match="unknown demo task 'cifar'"):
        SurgeryDataModule(tasks=["cifar"]).setup()


def test_default_tasks_are_the_demo_experts_not_the_pre_training_task() -> None:
    assert SurgeryDataModule().tasks == list(DEMO_EXPERT_TASKS)
