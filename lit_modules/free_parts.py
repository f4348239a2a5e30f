"""The picture of recovered images of ``lit_modules.free`` (the inversion loss is in ``core.dfml_losses``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image


def save_recovered_grid(images: list[Tensor], path: Path, per_row: int) -> Path:
    """One row per teacher of its recovered images (first ``per_row``), written as a PNG."""
    rows = torch.cat([x[:per_row].detach().cpu() for x in images])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(rows, nrow=per_row, padding=1, pad_value=0.5), str(path))
    return path
