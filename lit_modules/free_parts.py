"""Pieces of ``lit_modules.free`` that are not the training loop: the teacher step's inversion loss
and the picture of recovered images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.utils import make_grid, save_image

from core.bn_stats import BatchNormStatsPrior
from core.dfml_losses import hard_sample_loss


def inversion_loss(teacher: nn.Module, targets: Tensor, augment: Callable[[Tensor], Tensor],
                   student: Callable[[Tensor], Tensor] | None, ce_weight: float, adv_weight: float,
                   bn_weight: float, release_kl: bool) -> Callable[[Tensor], Tensor]:
    """L_inv(x) = ce CE(T(A(x)), y) + adv L_adv(S(A(x)), T(A(x))) + bn R_BN (FREE Sec. 3.1; bn off in FREE).

    The adversarial term needs a student and is skipped during warm-up (``student=None``)."""

    def loss(images: Tensor) -> Tensor:
        x = augment(images)
        if bn_weight > 0:
            with BatchNormStatsPrior(teacher, first_layer_multiplier=1.0) as prior:
                t_logits = teacher(x)
            total = bn_weight * prior.loss()
        else:
            t_logits, total = teacher(x), 0.0
        total = total + ce_weight * F.cross_entropy(t_logits, targets)
        if student is not None and adv_weight > 0:
            s_logits = student(x)  # detached student weights: the images get gradient through both networks
            total = total + adv_weight * hard_sample_loss(s_logits, t_logits, release=release_kl)
        return total

    return loss


def save_recovered_grid(images: list[Tensor], path: Path, per_row: int) -> Path:
    """One row per teacher of its recovered images (first ``per_row``), written as a PNG."""
    rows = torch.cat([x[:per_row].detach().cpu() for x in images])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(rows, nrow=per_row, padding=1, pad_value=0.5), str(path))
    return path
