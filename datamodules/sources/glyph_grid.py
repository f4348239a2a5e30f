"""Draw the glyph source as a PNG grid: classes down, faces across (blank where a face lacks the class).

    python -m datamodules.sources.glyph_grid --out runs/glyphs/grid.png            # 24 classes of meta_test
    python -m datamodules.sources.glyph_grid --out grid.png --classes all --size 32

Each cell is one rendered instance (seeded affine and stroke jitter) of the row's class in the column's face.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datamodules.sources.glyph_fonts import GLYPH_FACES, faces_with
from datamodules.sources.glyphs import glyph_splits, render_glyphs


def draw_glyph_grid(path: Path, classes: Sequence[str], size: int = 28, seed: int = 0) -> Path:
    """Write a classes x faces grid to ``path`` (PNG); refuses to overwrite an existing file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"--out {path} exists; choose another path or delete it first")
    grid = np.zeros((len(classes) * size, len(GLYPH_FACES) * size), np.uint8)
    for row, char in enumerate(classes):
        for face in faces_with(char):
            col = GLYPH_FACES.index(face)
            image = render_glyphs([char], per_class=1, size=size, faces=[face], seed=seed + row, cache=False)[0][0]
            grid[row * size : (row + 1) * size, col * size : (col + 1) * size] = image
    fig, ax = plt.subplots(figsize=(0.42 * len(GLYPH_FACES) + 1.5, 0.42 * len(classes) + 2.2))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
    ax.set_xticks(np.arange(len(GLYPH_FACES)) * size + size / 2, GLYPH_FACES, rotation=70, fontsize=7)
    ax.set_yticks(np.arange(len(classes)) * size + size / 2,
                  [f"{c}  U+{ord(c):04X}" for c in classes], fontsize=7, fontname="DejaVu Sans")
    ax.set_title(f"glyph source: {len(classes)} classes x {len(GLYPH_FACES)} faces ({size} px)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write (must not exist)")
    parser.add_argument("--classes", default="meta_test",
                        help="a split name of glyph_splits, 'all', or the characters themselves, e.g. 'AЖλ'")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    splits = glyph_splits(0)
    if args.classes == "all":
        classes = [c for name in ("meta_train", "meta_val", "meta_test") for c in splits[name]]
    else:
        classes = splits.get(args.classes, list(args.classes))
    print(draw_glyph_grid(args.out, classes, args.size, args.seed))


if __name__ == "__main__":
    main()
