"""Joint orthonormal heads (``head: joint``) and the held-out validation split the demo tunes lambda on."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from datamodules.surgery import SurgeryDataModule, TaskDataset
from datamodules.surgery_tasks import VAL_IMAGES, _split, demo_task
from lit_modules.surgery_expert import ExpertModule
from lit_modules.surgery_parts import class_means, joint_heads, prototype_head

VIT = {"img_size": 16, "patch_size": 8, "in_chans": 1, "num_classes": 12, "embed_dim": 24, "depth": 2, "num_heads": 2}


def test_joint_heads_are_orthonormal_across_tasks_and_nearest_to_the_class_means() -> None:
    gen = torch.Generator().manual_seed(0)
    common = torch.randn(16, generator=gen)
    feats = {t: common + 0.1 * torch.randn(40, 16, generator=gen) for t in ("a", "b")}  # both tasks nearly parallel
    labels = {"a": torch.arange(40) % 5, "b": torch.arange(40) % 4}
    means = [class_means(feats[t], labels[t], n) for t, n in (("a", 5), ("b", 4))]
    a, b = joint_heads(means, 100.0)
    assert a.shape == (5, 16) and b.shape == (4, 16)
    rows = torch.cat([a, b]) / 100
    torch.testing.assert_close(rows @ rows.T, torch.eye(9), atol=1e-5, rtol=0)
    # naive reference: (M M^T)^(-1/2) M of the stacked class means, in float64
    m = torch.cat(means).double()
    vals, vecs = torch.linalg.eigh(m @ m.T)
    torch.testing.assert_close(rows.double(), vecs @ torch.diag(vals.rsqrt()) @ vecs.T @ m, atol=2e-3, rtol=0)
    # per-task orthonormal heads of the two tasks overlap; the joint ones do not
    sep_a = prototype_head(feats["a"], labels["a"], 5, orthogonal=True) / 100
    sep_b = prototype_head(feats["b"], labels["b"], 4, orthogonal=True) / 100
    assert (sep_a @ sep_b.T).abs().max() > 0.3
    with pytest.raises(ValueError, match="representation width 16"):
        joint_heads([torch.randn(10, 16), torch.randn(10, 16)])


class _Data(L.LightningDataModule):
    """Two tiny labelled tasks; ``own`` is the task this expert trains."""

    def __init__(self, own: str, head_tasks: list[str]) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.sets = {t: TaskDataset(t, torch.randn(24, 1, 16, 16, generator=gen), torch.arange(24) % n)
                     for t, n in (("a", 3), ("b", 4))}
        self.tasks, self.head_tasks = [own], head_tasks
        self.class_names = {"a": ["0", "1", "2"], "b": ["0", "1", "2", "3"]}

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.sets[self.tasks[0]], batch_size=8)

    def head_dataloaders(self) -> dict:
        return {t: torch.utils.data.DataLoader(self.sets[t], batch_size=8) for t in self.head_tasks}


def _expert_head(own: str, classes: int, head_tasks: list[str]) -> torch.Tensor:
    torch.manual_seed(0)  # the same theta_0 for both experts
    module = ExpertModule("vit_tiny_patch16_224", VIT, num_classes=classes, head="joint", lr=0.0)
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", enable_checkpointing=False)
    trainer.fit(module, datamodule=_Data(own, head_tasks))
    return module.head.weight.detach().clone()


def test_joint_experts_build_one_shared_orthonormal_set() -> None:
    a, b = _expert_head("a", 3, ["a", "b"]), _expert_head("b", 4, ["a", "b"])
    rows = torch.cat([a, b]) / 100
    torch.testing.assert_close(rows @ rows.T, torch.eye(7), atol=1e-5, rtol=0)
    # the order of head_tasks does not change the set (the polar factor commutes with row permutations)
    torch.testing.assert_close(_expert_head("a", 3, ["b", "a"]), a, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="head_tasks listing this expert's task"):
        _expert_head("a", 3, ["b"])


def test_val_split_is_held_out_of_train_and_leaves_test_unchanged() -> None:
    data = demo_task("glyphs_c")
    flat = {k: x.flatten(1) for k, (x, _) in data.items()}
    assert len(flat["val"]) == VAL_IMAGES and len(flat["test"]) == 300
    for one, other in (("train", "val"), ("train", "test"), ("val", "test")):
        assert torch.cdist(flat[one], flat[other]).min() > 0  # no image in two splits
    dm = SurgeryDataModule(tasks=["glyphs_c", "digits"], eval_batch_size=64)
    dm.setup()
    loaders = dm.tuning_dataloader()
    assert [len(loader.dataset) for loader in loaders] == [VAL_IMAGES, VAL_IMAGES]
    assert "label" in next(iter(loaders[0]))
    norm = (data["val"][0] - 0.5) / 0.5
    torch.testing.assert_close(loaders[0].dataset.images, norm)
    assert torch.equal(_split(1000, 300, 0, 0)[2], _split(1000, 300, VAL_IMAGES, 0)[2])  # test does not move
