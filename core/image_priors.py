"""Image priors and augmentations of DeepInversion-style model inversion.

Yin et al., "Dreaming to Distill" (CVPR 2020), used by Sparse Model Inversion as its dense base.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _neighbour_differences(x: Tensor) -> tuple[Tensor, ...]:
    """Horizontal, vertical and the two diagonal pixel differences of a (B, C, H, W) batch."""
    return (
        x[:, :, :, :-1] - x[:, :, :, 1:],
        x[:, :, :-1, :] - x[:, :, 1:, :],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
        x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
    )


def total_variation_l2(x: Tensor) -> Tensor:
    """Sum of the Frobenius norms (not squared) of the four neighbour differences over the batch."""
    return sum(d.norm() for d in _neighbour_differences(x))


def total_variation_l1(x: Tensor) -> Tensor:
    """Sum of the mean absolute neighbour differences (the four directions)."""
    return sum(d.abs().mean() for d in _neighbour_differences(x))


def random_roll_flip(
    x: Tensor, max_shift: int, flip: bool, generator: torch.Generator | None = None
) -> tuple[Tensor, tuple[int, int], bool]:
    """Roll the whole batch by one random offset in [-max_shift, max_shift] per axis, then maybe flip.

    One offset and one flip decision for the whole batch, as DeepInversion and SMI do.

    Returns:
        ``(augmented, (shift_h, shift_w), flipped)`` so that kept token positions can be remapped.
    """
    shift = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist() if max_shift else [0, 0]
    flipped = bool(flip and torch.rand((), generator=generator) < 0.5)
    out = torch.roll(x, shifts=(shift[0], shift[1]), dims=(2, 3))
    if flipped:
        out = out.flip(dims=(3,))
    return out, (shift[0], shift[1]), flipped


def clamp_to_pixel_range(x: Tensor, mean: Tensor, std: Tensor) -> None:
    """Clamp normalised images in place so that they de-normalise into [0, 1] per channel."""
    lo, hi = (-mean / std).view(1, -1, 1, 1), ((1 - mean) / std).view(1, -1, 1, 1)
    x.copy_(torch.maximum(torch.minimum(x, hi), lo))
