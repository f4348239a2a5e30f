"""Few-shot data: each zoo teacher sees only its own classes; evaluation episodes are relabelled and fixed."""

from __future__ import annotations

import torch

from datamodules.few_shot import labelled_split
from datamodules.free import FewShotEpisodes
from datamodules.model_zoo import ZooData


def test_each_teacher_sees_only_its_own_classes() -> None:
    data = ZooData(source="digits", image_size=16, per_class=20, n_teachers=3, classes_per_teacher=3, batch_size=4)
    data.setup("fit")
    images, labels, names = labelled_split("digits", "meta_train", 20, 16)
    assert data.class_names == names and data.teacher_classes.shape == (3, 3)
    for split in ("train", "val"):
        stacked = data.sets[split]
        absolute = labels[stacked.index]  # (N, M) split labels of every teacher's images
        assert torch.equal(absolute, torch.gather(data.teacher_classes, 1, stacked.labels))
    train, held_out = data.sets["train"].index, data.sets["val"].index
    assert len(set(train[0].tolist()) & set(held_out[0].tolist())) == 0
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 3, 1, 16, 16) and y.shape == (4, 3)


def test_episodes_are_relabelled_by_position_and_fixed() -> None:
    data = FewShotEpisodes(source="digits", image_size=16, per_class=20, k_shot=2, q_query=3, val_episodes=5,
                           episodes_per_batch=5)
    data.setup("fit")
    support, query = next(iter(data.val_dataloader()))
    assert support.shape == (5, 5, 2, 1, 16, 16) and query.shape == (5, 5, 3, 1, 16, 16)
    images, labels, _ = labelled_split("digits", "meta_val", 20, 16)
    idx = data.sets["val"].indices
    assert (labels[idx] == labels[idx[:, :, :1]]).all()  # one class per position
    assert (labels[idx[:, :, 0]].sort(1).values == torch.arange(5)).all()  # five distinct classes per episode
    again = FewShotEpisodes(source="digits", image_size=16, per_class=20, k_shot=2, q_query=3, val_episodes=5)
    again.setup("fit")
    assert torch.equal(again.sets["val"].indices, idx)
