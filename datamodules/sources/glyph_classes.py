"""Which characters are glyph classes: script coverage, an explicit homoglyph table, a measured check.

A class must be covered by at least :data:`MIN_FACES` of the 21 faces and must not look like a class
kept before it. Two rules decide "looks like", applied in this order over the candidates (digits, Latin
capitals, Latin small, Greek capitals, Greek small, Cyrillic capitals, Cyrillic small):

1. :data:`HOMOGLYPHS`, an explicit table of groups that print alike: the same letter in three scripts
   (Latin A, Greek Alpha, Cyrillic A), letters whose small form is a reduced capital (c/C, o/O, s/S,
   Cyrillic ш/Ш, ...), and digit/letter pairs (0/O, 1/l/I, 3/З). The first member of a group is kept.
2. A measured threshold for what the table misses: the mean cosine similarity, over the faces both
   characters have, of their clean masters (:func:`~datamodules.sources.glyph_fonts.render_master`),
   taken both as rendered (size and position kept) and rescaled to fill the canvas (so that a small
   letter is compared with a capital at equal size). A candidate whose larger similarity to any kept
   class reaches :data:`SIMILARITY_THRESHOLD` is dropped.

:func:`dropped_classes` says which rule dropped each candidate and which kept class it resembles.
"""

from __future__ import annotations

import functools
import unicodedata

import numpy as np

from datamodules.sources.glyph_fonts import (
    GLYPH_FACES,
    MASTER_SIZE,
    face_codepoints,
    faces_with,
    render_master,
)

MIN_FACES = 16
"""Every class is drawn by at least this many faces (Latin letters and digits by all 21)."""

SIMILARITY_THRESHOLD = 0.90
"""Rule 2's cut on the mean master cosine; 0.90 drops Greek Lambda (0.93 to A), Theta (0.92 to O), Cyrillic
Zhe-like pairs and the like, while distinct letters of one script stay below it (measured: b/h 0.87)."""

_BLOCKS = (
    (0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A),  # digits, Latin capital and small letters
    (0xC0, 0xFF), (0x100, 0x17F), (0x259, 0x259), (0x283, 0x283),  # Latin-1 and Extended-A letters, schwa, esh
    (0x391, 0x3A9), (0x3B1, 0x3C9),  # Greek capital and small letters
    (0x400, 0x45F), (0x462, 0x463), (0x472, 0x473), (0x490, 0x491),  # Cyrillic (with yat, fita, ghe with upturn)
)


def _is_candidate(char: str) -> bool:
    """A letter or digit that is not a base letter plus a diacritic (no Unicode decomposition): otherwise
    E and E-with-diaeresis would be two classes that differ by two dots."""
    return (char.isalpha() or char.isdigit()) and not unicodedata.decomposition(char)


CANDIDATES: tuple[str, ...] = tuple(
    char for lo, hi in _BLOCKS for char in map(chr, range(lo, hi + 1)) if _is_candidate(char)
)
"""Digits, Latin, Greek and Cyrillic letters without diacritics, in the order that decides which homoglyph is
kept (Latin before Greek before Cyrillic)."""

HOMOGLYPHS: tuple[str, ...] = (
    # the same capital in Latin, Greek and Cyrillic (and the Latin small letters that print like them)
    "AΑА", "BΒВ", "CСcс", "EΕЕ", "HΗН", "I1lΙ", "KΚКκкĸ", "MΜМ", "NΝ", "O0oΟοОо", "PΡР", "TΤТ",
    "XΧХxх", "YΥУ", "ZΖz", "aа", "eе", "pрρ", "yу", "ΓГ", "ΠП", "ΦФ",
    # a small letter that is a reduced capital of its own script
    "SsЅѕ", "iі", "JЈ", "jј", "ÐĐ", "Ææ", "Øø", "Œœ", "Uu", "Vv", "Ww", "Бб", "Вв", "Гг", "Дд", "Жж", "3Зз", "Ии", "Йй", "Лл", "Мм", "Нн",
    "Пп", "Тт", "Фф", "Цц", "Чч", "Шш", "Щщ", "Ъъ", "Ыы", "Ьь", "Ээ", "Юю", "Яя",
)
"""Groups of characters that print alike; only the first member of each group can become a class."""


def _homoglyph_representative() -> dict[str, str]:
    table: dict[str, str] = {}
    for group in HOMOGLYPHS:
        for char in group[1:]:
            table[char] = group[0]
    return table


def _filled(master: np.ndarray) -> np.ndarray:
    """The master's ink box rescaled (bilinear) to fill 3/4 of the canvas, so sizes no longer differ."""
    from PIL import Image

    ys, xs = np.nonzero(master > 0.1)
    crop = master[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    scale = 0.75 * MASTER_SIZE / max(crop.shape)
    h, w = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    resized = np.asarray(Image.fromarray((crop * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR))
    out = np.zeros((MASTER_SIZE, MASTER_SIZE), np.float32)
    top, left = (MASTER_SIZE - h) // 2, (MASTER_SIZE - w) // 2
    out[top : top + h, left : left + w] = resized / 255.0
    return out


def similarity_matrix(chars: tuple[str, ...]) -> np.ndarray:
    """Rule 2's similarity of every pair of ``chars``: (n, n) float64.

    For each face, the cosine of the two masters as rendered and after :func:`_filled`; each is averaged
    over the faces both characters have, and the larger of the two averages is the similarity (0 when no
    face has both).
    """
    n, dims = len(chars), MASTER_SIZE * MASTER_SIZE
    sums, count = np.zeros((2, n, n)), np.zeros((n, n))
    for face in GLYPH_FACES:
        have = np.array([ord(c) in face_codepoints(face) for c in chars])
        views = np.zeros((2, n, dims))
        for i in np.flatnonzero(have):
            master = render_master(face, chars[i])
            views[0, i], views[1, i] = master.ravel(), _filled(master).ravel()
        views /= np.maximum(np.linalg.norm(views, axis=2, keepdims=True), 1e-12)
        sums += views @ views.transpose(0, 2, 1)
        count += np.outer(have, have)
    return (sums / np.maximum(count, 1)).max(axis=0)


@functools.cache
def _selection() -> tuple[tuple[str, ...], tuple[tuple[str, str, str], ...]]:
    representative = _homoglyph_representative()
    covered = tuple(c for c in CANDIDATES if len(faces_with(c)) >= MIN_FACES)
    similarity = similarity_matrix(covered)
    kept: list[int] = []
    dropped: list[tuple[str, str, str]] = [
        (c, "coverage", f"{len(faces_with(c))} faces") for c in CANDIDATES if c not in covered
    ]
    for i, char in enumerate(covered):
        nearest = max(kept, key=lambda k: similarity[i, k], default=None)
        if char in representative:
            dropped.append((char, "table", representative[char]))
        elif nearest is not None and similarity[i, nearest] >= SIMILARITY_THRESHOLD:
            dropped.append((char, "similarity", f"{covered[nearest]} ({similarity[i, nearest]:.3f})"))
        else:
            kept.append(i)
    return tuple(covered[i] for i in kept), tuple(dropped)


def glyph_classes() -> tuple[str, ...]:
    """Every glyph class, in candidate order (a class id elsewhere is a position in a split's list)."""
    return _selection()[0]


def dropped_classes() -> tuple[tuple[str, str, str], ...]:
    """(character, rule, detail) for every candidate that is not a class: rule is ``coverage``, ``table``
    (detail: the kept look-alike) or ``similarity`` (detail: the kept look-alike and the score)."""
    return _selection()[1]
