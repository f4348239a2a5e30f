"""Batched train-time augmentation of image tensors on their device: random crop with padding and flip.

The CIFAR pipeline of mammoth (``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``) runs per sample
on PIL images, on the CPU, also for every replayed buffer example; that dominates the run time. Here the
same distribution of crops and flips is drawn for a whole batch at once, from a given generator.
Deviation: padding is applied to the already-normalised tensor, so padded pixels hold the dataset mean
(value 0) instead of black.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop_flip(images: Tensor, padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Shift each image by a uniform offset in ``[-padding, padding]`` per axis (zero fill) and mirror
    half of them horizontally when ``flip``. ``generator`` lives on the CPU; the result is on the
    images' device. ``padding=0`` and ``flip=False`` return the input unchanged."""
    if padding == 0 and not flip:
        return images
    batch, _, height, width = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator)
    mirrored = torch.rand(batch, generator=generator) < 0.5 if flip else torch.zeros(batch, dtype=torch.bool)
    rows = (offsets[0, :, None] + torch.arange(height)).to(images.device)
    cols = torch.arange(width).expand(batch, width)
    cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    cols = (offsets[1, :, None] + cols).to(images.device)
    padded = F.pad(images, (padding, padding, padding, padding))
    batch_index = torch.arange(batch, device=images.device)[:, None, None]
    # (B, H, W, C) gathered from (B, C, H + 2p, W + 2p), then channels first again
    return padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
