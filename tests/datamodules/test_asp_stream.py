"""The FSCIL side of ClassIncrementalStream: the glyph entry, fixed index lists and session-plan errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datamodules.class_incremental import ClassIncrementalStream
from datamodules.sources import glyph_splits


@pytest.mark.slow  # rendering the glyphs the first time (later runs read the cache)
def test_glyph_stream_is_60_base_classes_then_8_five_way_five_shot_sessions() -> None:
    dm = ClassIncrementalStream("glyphs", initial_classes=60, classes_per_task=5, shots=5, glyph_per_class=26,
                                test_per_class=6)
    dm.setup("fit")
    assert dm.num_tasks == 9 and dm.task_classes()[0] == list(range(60))
    counts = torch.bincount(dm.splits["train"].labels, minlength=100)
    assert counts[:60].tolist() == [20] * 60 and counts[60:].tolist() == [5] * 40
    assert torch.bincount(dm.splits["test"].labels, minlength=100).tolist() == [6] * 100
    assert dm.splits["train"].images.shape[1:] == (1, 28, 28)
    assert len(glyph_splits(seed=0)["fscil"]) == 100


def write_lists(folder: Path, sessions: list[list[int]]) -> Path:
    folder.mkdir()
    for t, idx in enumerate(sessions):
        (folder / f"session_{t + 1}.txt").write_text("\n".join(map(str, idx)) + "\n")
    return folder


def test_fixed_index_lists_select_exactly_the_listed_training_images(tmp_path: Path) -> None:
    plain = ClassIncrementalStream("digits", initial_classes=6, classes_per_task=2, test_per_class=30)
    plain.setup("fit")
    train = plain.splits["train"]
    by_class = [(train.labels == c).nonzero().squeeze(1) for c in range(10)]
    # indices into the training images: all of the base classes, 3 chosen images of every new class
    sessions = [torch.cat(by_class[:6]).tolist()] + [torch.cat([by_class[c][[0, 5, 9]] for c in (6 + 2 * s, 7 + 2 * s)])
                                                      .tolist() for s in range(2)]
    folder = write_lists(tmp_path / "lists", sessions)
    dm = ClassIncrementalStream("digits", initial_classes=6, classes_per_task=2, test_per_class=30,
                                index_lists=str(folder))
    dm.setup("fit")
    chosen = dm.splits["train"]
    assert torch.bincount(chosen.labels, minlength=10).tolist() == [len(by_class[c]) for c in range(6)] + [3] * 4
    for c in range(6, 10):
        expected = train.images[by_class[c][[0, 5, 9]]]
        assert torch.equal(chosen.images[chosen.labels == c], expected)


def test_index_lists_naming_a_class_of_another_session_are_refused(tmp_path: Path) -> None:
    plain = ClassIncrementalStream("digits", initial_classes=6, classes_per_task=2, test_per_class=30)
    plain.setup("fit")
    labels = plain.splits["train"].labels
    base = (labels < 6).nonzero().squeeze(1).tolist()
    stray = [int((labels == 9).nonzero()[0])]  # class 9 belongs to the last session, not the first
    folder = write_lists(tmp_path / "lists", [base, stray, stray])
    dm = ClassIncrementalStream("digits", initial_classes=6, classes_per_task=2, test_per_class=30,
                                index_lists=str(folder))
    with pytest.raises(ValueError, match=r"data.init_args.index_lists: .*session_2.txt .*classes \[9\]"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="data.init_args.index_lists"):
        ClassIncrementalStream("digits", index_lists=str(tmp_path / "missing"))


def test_more_shots_than_images_and_bad_session_plans_name_the_key() -> None:
    dm = ClassIncrementalStream("digits", initial_classes=6, classes_per_task=2, shots=500, test_per_class=30)
    with pytest.raises(ValueError, match=r"data.init_args.shots=500 but class 6 .* has only"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="data.init_args.class_order"):  # overlapping sessions
        ClassIncrementalStream("digits", class_order=[0, 1, 2, 3, 4, 5, 6, 7, 8, 8])
    with pytest.raises(ValueError, match="data.init_args.classes_per_task"):  # more classes than the dataset
        ClassIncrementalStream("digits", initial_classes=12, classes_per_task=2)
    with pytest.raises(ValueError, match="data.init_args.resize must be set for cub200"):
        ClassIncrementalStream("cub200", root=".")
    with pytest.raises(FileNotFoundError, match="data.init_args.root"):
        ClassIncrementalStream("cifar100", root=None)
