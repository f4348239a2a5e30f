"""The TrueType faces that ship inside matplotlib, and clean glyph masters rendered from them.

:mod:`datamodules.sources.glyphs` builds its instances from these masters: one grayscale image per
(face, character), the glyph centred on its ink bounding box at a fixed point size, so that relative
size (a lowercase letter is smaller than a capital) survives. A face renders only the characters its
``cmap`` maps; asking for another raises instead of drawing the font's "missing glyph" box.

Faces (21): DejaVu Sans, Sans Mono and Serif with their bold / oblique (italic) styles (12), STIX General
in four styles, and the Computer Modern (BaKoMa) cmr10, cmb10, cmti10, cmss10 and cmtt10, which cover ASCII
letters and digits only. Skipped: DejaVu's "Display" faces, STIX "NonUni" and the size-variant and symbol
faces (cmex10, cmmi10, cmsy10): they hold symbols, sizes or remapped code points, not plain characters.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

GLYPH_FACES: tuple[str, ...] = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSans-Oblique",
    "DejaVuSans-BoldOblique",
    "DejaVuSansMono",
    "DejaVuSansMono-Bold",
    "DejaVuSansMono-Oblique",
    "DejaVuSansMono-BoldOblique",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSerif-Italic",
    "DejaVuSerif-BoldItalic",
    "STIXGeneral",
    "STIXGeneralBol",
    "STIXGeneralItalic",
    "STIXGeneralBolIta",
    "cmr10",
    "cmb10",
    "cmti10",
    "cmss10",
    "cmtt10",
)
"""The 21 text faces, by file stem under matplotlib's ``mpl-data/fonts/ttf``; a face id is an index here."""

HELDOUT_FACES: tuple[str, ...] = ("DejaVuSansMono-BoldOblique", "DejaVuSerif-Italic", "STIXGeneralBolIta", "cmss10")
"""Faces kept out of ``faces="train"`` so that generalisation to unseen typefaces can be measured: one per
family, chosen among the styles that differ most from the upright regular faces."""

MASTER_SIZE = 64
"""Side of a master image in pixels; instances are resampled from it (so 28 and 32 px share masters)."""

POINT_SIZE = 40
"""Font size of every master: a capital fills about 3/4 of the master's height."""


def font_dir() -> Path:
    """matplotlib's TrueType folder, checked to hold every face of :data:`GLYPH_FACES`.

    Raises:
        FileNotFoundError: the folder or some face file is missing (names both and the fix).
    """
    import matplotlib  # a core dependency of litzoo; imported here so importing the sources stays cheap

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    missing = [f"{face}.ttf" for face in GLYPH_FACES if not (folder / f"{face}.ttf").is_file()]
    if missing:
        raise FileNotFoundError(
            f"glyph source: {len(missing)} font file(s) missing from matplotlib's font folder {folder}: "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; reinstall matplotlib "
            "(pip install --force-reinstall matplotlib)"
        )
    return folder


@functools.cache
def face_codepoints(face: str) -> frozenset[int]:
    """Code points that ``face`` maps to a glyph (its best ``cmap`` subtable, read with fontTools)."""
    from fontTools.ttLib import TTFont  # ships with matplotlib

    with TTFont(font_dir() / f"{face}.ttf", lazy=True) as font:
        return frozenset(font.getBestCmap() or {})


def faces_with(char: str, faces: tuple[str, ...] = GLYPH_FACES) -> tuple[str, ...]:
    """The faces among ``faces`` whose cmap holds ``char``, in the order given."""
    return tuple(face for face in faces if ord(char) in face_codepoints(face))


@functools.cache
def _font(face: str):  # noqa: ANN202 - a PIL FreeTypeFont
    from PIL import ImageFont

    return ImageFont.truetype(str(font_dir() / f"{face}.ttf"), POINT_SIZE)


@functools.cache
def render_master(face: str, char: str) -> np.ndarray:
    """The clean master of ``char`` in ``face``: float32 (MASTER_SIZE, MASTER_SIZE) in [0, 1], white ink.

    The ink's bounding box is centred; a glyph larger than the canvas (a few wide capitals in bold
    faces) is scaled down to fit with a 2-pixel margin.

    Raises:
        ValueError: ``face`` has no glyph for ``char`` (it would draw a "tofu" box), or the glyph is blank.
    """
    from PIL import Image, ImageDraw

    if face not in GLYPH_FACES:
        raise ValueError(f"glyph source: unknown face {face!r}; choose from {', '.join(GLYPH_FACES)}")
    if ord(char) not in face_codepoints(face):
        raise ValueError(f"glyph source: face {face} has no glyph for {char!r} (U+{ord(char):04X})")
    font = _font(face)
    left, top, right, bottom = font.getbbox(char)
    width, height = max(right - left, 1), max(bottom - top, 1)
    canvas = Image.new("L", (width + 4, height + 4), 0)
    ImageDraw.Draw(canvas).text((2 - left, 2 - top), char, fill=255, font=font)
    limit = MASTER_SIZE - 4
    if max(canvas.size) > limit:  # shrink to fit, keeping the aspect ratio
        scale = limit / max(canvas.size)
        canvas = canvas.resize((max(1, round(canvas.width * scale)), max(1, round(canvas.height * scale))),
                               Image.Resampling.LANCZOS)
    master = Image.new("L", (MASTER_SIZE, MASTER_SIZE), 0)
    master.paste(canvas, ((MASTER_SIZE - canvas.width) // 2, (MASTER_SIZE - canvas.height) // 2))
    out = np.asarray(master, dtype=np.float32) / 255.0
    if out.max() <= 0.0:
        raise ValueError(f"glyph source: face {face} draws {char!r} (U+{ord(char):04X}) blank")
    out.setflags(write=False)
    return out
