"""Image priors and augmentations of DeepInversion-style model inversion.

Yin et al., "Dreaming to Distill" (CVPR 2020), used by Sparse Model Inversion as its dense base.
"""

from __future__ import annotations

import torch
from torch import Tensor

_ALL = slice(None)
# (minuend, subtrahend) slices of the horizontal, vertical and the two diagonal neighbour differences
_PAIRS = (
    ((_ALL, _ALL, _ALL, slice(None, -1)), (_ALL, _ALL, _ALL, slice(1, None))),
    ((_ALL, _ALL, slice(None, -1), _ALL), (_ALL, _ALL, slice(1, None), _ALL)),
    ((_ALL, _ALL, slice(1, None), slice(None, -1)), (_ALL, _ALL, slice(None, -1), slice(1, None))),
    ((_ALL, _ALL, slice(None, -1), slice(None, -1)), (_ALL, _ALL, slice(1, None), slice(1, None))),
)


def _neighbour_differences(x: Tensor) -> tuple[Tensor, ...]:
    """Horizontal, vertical and the two diagonal pixel differences of a (B, C, H, W) batch."""
    return tuple(x[a] - x[b] for a, b in _PAIRS)


class _TotalVariationL2(torch.autograd.Function):
    """sum_k ||D_k x||_F with a hand-written backward.

    The gradient D_k^T (D_k x / ||D_k x||) is accumulated into one buffer; autograd's version
    allocates a zero-filled full image per slice and is ~3.5x slower, which on the full image costs
    as much as a few transformer blocks on the sparse token set.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        diffs = _neighbour_differences(x)
        norms = torch.stack([d.norm() for d in diffs])
        ctx.save_for_backward(norms, *diffs)
        ctx.image_shape = x.shape
        return norms.sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        norms, *diffs = ctx.saved_tensors
        scales = torch.where(norms > 0, grad / norms, torch.zeros_like(norms))  # subgradient 0 at 0
        out = norms.new_zeros(ctx.image_shape)
        for (a, b), d, scale in zip(_PAIRS, diffs, scales):
            out[a].addcmul_(d, scale)  # in place, no temporary of the image's size
            out[b].addcmul_(d, scale, value=-1)
        return out


def total_variation_l2(x: Tensor) -> Tensor:
    """Sum of the Frobenius norms (not squared) of the four neighbour differences over the batch."""
    return _TotalVariationL2.apply(x)


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
