"""ClassIncrementalStream: task contents, class orders, few-shot sampling, epoch schedule, bad input."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from datamodules.class_incremental import ClassIncrementalStream


def labels_of(loader) -> torch.Tensor:
    return torch.cat([b["label"] for b in loader])


def test_each_task_trains_on_its_classes_and_evaluation_covers_every_task() -> None:
    dm = ClassIncrementalStream("digits", classes_per_task=2, epochs_per_task=[1, 2, 1, 1, 1], test_per_class=36)
    dm.setup("fit")
    assert dm.task_classes() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert [dm.task_of_epoch(e) for e in range(7)] == [0, 1, 1, 2, 3, 4, 4]
    assert [dm.is_task_end(e) for e in range(6)] == [True, False, True, True, True, True]
    for task in range(5):
        ys = labels_of(dm._loader(dm._task_subset("train", task), train=True))
        assert set(ys.tolist()) == set(dm.task_classes()[task])
    assert torch.equal(dm.splits["train"].tasks, dm.splits["train"].labels // 2)
    tests = dm.test_dataloader()
    assert len(tests) == 5 and all(set(labels_of(t).tolist()) == set(c) for t, c in zip(tests, dm.task_classes()))
    assert len(labels_of(tests[0])) == 72  # 36 per class held out
    train_images = dm.splits["train"].images
    assert not any(torch.equal(train_images[0], x) for x in dm.splits["test"].images)


def test_class_order_remaps_labels_and_a_seeded_shuffle_is_reproducible() -> None:
    order = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]
    dm = ClassIncrementalStream("digits", class_order=order, test_per_class=36)
    dm.setup("fit")
    from datamodules.sources import sklearn_digits

    images, raw = sklearn_digits()
    first = dm.splits["train"]
    # the stream label of an image is the position of its original class in the order
    row = next(i for i in range(len(raw)) if torch.equal(images[i], first.images[0]))
    assert order[int(first.labels[0])] == int(raw[row])
    a = ClassIncrementalStream("digits", shuffle_classes=True, stream_seed=4).class_order
    assert a == ClassIncrementalStream("digits", shuffle_classes=True, stream_seed=4).class_order
    assert sorted(a) == list(range(10)) and a != list(range(10))


def test_few_shot_tasks_and_an_initial_task_of_its_own_size() -> None:
    dm = ClassIncrementalStream("mnist5k", classes_per_task=1, initial_classes=6, shots=5, test_per_class=100)
    dm.setup("fit")
    assert dm.num_tasks == 5 and dm.task_classes()[0] == list(range(6))
    counts = torch.bincount(dm.splits["train"].labels, minlength=10)
    assert counts[:6].tolist() == [400] * 6 and counts[6:].tolist() == [5] * 4


def test_train_batches_are_reproducible_per_epoch_and_the_trainer_is_set_up() -> None:
    dm = ClassIncrementalStream("digits", epochs_per_task=2, test_per_class=36)
    trainer = L.Trainer(accelerator="cpu", logger=False, max_epochs=1000)
    dm.trainer = trainer
    dm.setup("fit")
    assert trainer.max_epochs == 10 and trainer.reload_dataloaders_every_n_epochs == 1
    a, b = dm.train_dataloader(), dm.train_dataloader()
    assert torch.equal(labels_of(a), labels_of(b)) and next(iter(a))["image"].shape == (32, 1, 8, 8)


def test_bad_streams_name_the_config_key(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"class_order must list each of the 10 classes.*missing \[9\]"):
        ClassIncrementalStream("digits", class_order=[0, 1, 2, 3, 4, 5, 6, 7, 8, 8])
    with pytest.raises(ValueError, match="classes_per_task=3"):
        ClassIncrementalStream("digits", classes_per_task=3)
    with pytest.raises(ValueError, match="epochs_per_task needs 5"):
        ClassIncrementalStream("digits", epochs_per_task=[1, 2])
    with pytest.raises(FileNotFoundError, match="data.init_args.root: no local cifar10"):
        ClassIncrementalStream("cifar10", root=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="data.init_args.root: cannot read cifar100"):
        ClassIncrementalStream("cifar100", root=str(tmp_path)).setup("fit")
    with pytest.raises(ValueError, match="val_per_class > 0"):
        ClassIncrementalStream("digits", eval_split="val").setup("fit")
    with pytest.raises(ValueError, match="val_per_class > 0"):  # before any data is read
        ClassIncrementalStream("cifar10", root=str(tmp_path), eval_split="val")


def rows(images: torch.Tensor) -> set[bytes]:
    return {bytes(x.numpy().tobytes()) for x in images}


def test_one_fixed_test_split_that_no_seed_trains_or_tunes_on() -> None:
    """The review's leak: with the test split keyed by stream_seed, seed 100's validation images were
    another seed's test images. With split_seed fixed, no seed's train or val split holds a test image."""
    splits = {}
    for seed in (0, 1, 7, 100, 101):
        dm = ClassIncrementalStream("digits", test_per_class=36, val_per_class=10, eval_split="val",
                                    stream_seed=seed, split_seed=0)
        dm.setup("fit")
        splits[seed] = {k: rows(v.images) for k, v in dm.splits.items()}
    test = splits[0]["test"]
    assert len(test) > 300 and all(s["test"] == test for s in splits.values())
    for seed, parts in splits.items():
        assert not (parts["train"] | parts["val"]) & test, seed
        assert not parts["train"] & parts["val"], seed
    assert splits[0]["val"] != splits[1]["val"]  # validation still varies with the seed, inside the training data
    keyed = ClassIncrementalStream("digits", test_per_class=36, stream_seed=1)  # split_seed None: keyed (ASP)
    keyed.setup("fit")
    assert rows(keyed.splits["test"].images) != test
