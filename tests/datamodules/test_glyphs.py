"""The glyph source: determinism, splits, homoglyphs, face coverage, refusals and the dataset view."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.sources import GLYPH_FACES, HELDOUT_FACES, GlyphSet, glyph_fonts, glyph_splits, render_glyphs
from datamodules.sources.glyph_classes import (
    HOMOGLYPHS,
    MIN_FACES,
    SIMILARITY_THRESHOLD,
    dropped_classes,
    glyph_classes,
    similarity_matrix,
)
from datamodules.sources.glyph_fonts import faces_with, render_master


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITZOO_CACHE", str(tmp_path / "cache"))


def test_same_seed_same_bytes_and_the_cache_returns_them(tmp_path: Path) -> None:
    chars = ["A", "ж", "7"]
    first = render_glyphs(chars, per_class=6, size=28, seed=3, noise=0.1, cache=False)
    second = render_glyphs(chars, per_class=6, size=28, seed=3, noise=0.1, cache=False)
    for a, b in zip(first, second):
        assert a.tobytes() == b.tobytes()
    cached_miss = render_glyphs(chars, per_class=6, size=28, seed=3, noise=0.1)
    assert len(list((tmp_path / "cache" / "glyphs").glob("*.npz"))) == 1
    cached_hit = render_glyphs(chars, per_class=6, size=28, seed=3, noise=0.1)
    for a, b, c in zip(first, cached_miss, cached_hit):
        assert a.tobytes() == b.tobytes() == c.tobytes()
    other = render_glyphs(chars, per_class=6, size=28, seed=4, noise=0.1, cache=False)
    assert other[0].tobytes() != first[0].tobytes()


def test_render_shapes_labels_and_faces_cycle() -> None:
    images, labels, faces = render_glyphs(["B", "ф"], per_class=32, size=32, cache=False)
    assert images.shape == (64, 32, 32) and images.dtype == np.uint8
    assert labels.tolist() == [0] * 32 + [1] * 32
    # Latin letters come in all 21 faces, Cyrillic in 16: instances cycle over every one of them.
    assert len(set(faces[:32].tolist())) == len(GLYPH_FACES)
    assert len(set(faces[32:].tolist())) == len(faces_with("ф")) == 16
    assert images.max() == 255 and images.reshape(64, -1).mean(1).min() > 5  # real ink, no blank image


def test_splits_counts_and_disjointness() -> None:
    splits = glyph_splits(0)
    classes = glyph_classes()
    meta = [splits[k] for k in ("meta_train", "meta_val", "meta_test")]
    assert [len(s) for s in meta] == [78, 20, 25] and sum(map(len, meta)) == len(classes) == 123
    for a, b in itertools.combinations(meta, 2):
        assert not set(a) & set(b)
    assert set().union(*map(set, meta)) == set(classes)
    assert len(splits["fscil"]) == len(set(splits["fscil"])) == 100
    assert not set(splits["fscil"]) & set(splits["pretrain"])
    assert set(splits["fscil"]) | set(splits["pretrain"]) == set(classes)
    assert glyph_splits(0) == splits and glyph_splits(1)["meta_test"] != splits["meta_test"]


def test_homoglyph_table_and_similarity_threshold_hold() -> None:
    classes = set(glyph_classes())
    for group in HOMOGLYPHS:
        assert len(classes & set(group)) <= 1, group
    assert {"O", "C", "S", "X", "A"} <= classes
    assert not {"0", "o", "Ο", "О", "c", "с", "s", "x", "Α", "А"} & classes
    kept = glyph_classes()
    similarity = similarity_matrix(kept)
    np.fill_diagonal(similarity, 0.0)
    assert similarity.max() < SIMILARITY_THRESHOLD
    rules = {rule for _, rule, _ in dropped_classes()}
    assert {"table", "similarity"} <= rules <= {"coverage", "table", "similarity"}


def test_every_class_has_the_promised_faces() -> None:
    assert all(len(faces_with(c)) >= MIN_FACES for c in glyph_classes())


def test_a_face_without_the_glyph_is_refused() -> None:
    assert ord("Ж") not in glyph_fonts.face_codepoints("cmr10")
    with pytest.raises(ValueError, match="cmr10 has no glyph"):
        render_master("cmr10", "Ж")
    with pytest.raises(ValueError, match="no selected face"):
        render_glyphs(["Ж"], per_class=2, faces=["cmr10"], cache=False)


def test_missing_font_folder_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    monkeypatch.setattr(matplotlib, "get_data_path", lambda: str(tmp_path / "mpl-data"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "mpl-data" / "fonts" / "ttf")):
        glyph_fonts.font_dir()


def test_face_splits_never_mix() -> None:
    train = GlyphSet(["E", "я"], per_class=40, faces="train")
    held = GlyphSet(["E", "я"], per_class=8, faces="heldout")
    heldout_ids = {GLYPH_FACES.index(f) for f in HELDOUT_FACES}
    assert not set(train.faces.tolist()) & heldout_ids
    assert set(held.faces.tolist()) <= heldout_ids


def test_dataset_view() -> None:
    ds = GlyphSet("meta_val", per_class=3, size=28, channels=3)
    assert len(ds) == 60 and ds.classes == glyph_splits(0)["meta_val"]
    image, label = ds[4]
    assert image.shape == (3, 28, 28) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert label == 1 and torch.equal(image[0], image[2])
    images, labels = ds.tensors()
    assert images.shape == (60, 3, 28, 28) and torch.equal(images[4], image) and labels[4] == label
    with pytest.raises(ValueError, match="classes='meta_tset'"):
        GlyphSet("meta_tset")
