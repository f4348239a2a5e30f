"""Losses of data-free meta-learning from a model zoo (FREE, CVPR 2024; TGR, ICML 2024).

Both releases call ``F.kl_div(softmax(s), softmax(t))``: probabilities where the log-input belongs.
Its value is mean_{b,c} t (log t - p_s) and its gradient only raises sum_c t_c p_s,c (the expected
agreement), not KL(t || s). The paper's intent is distillation, so the default is the true KL; the
``release`` variants reproduce the released behaviour.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.bn_stats import BatchNormStatsPrior
from core.kd import kd_kl_div


def distill(student_logits: Tensor, teacher_logits: Tensor, release: bool = False) -> Tensor:
    """KD of a student to a teacher: KL(p_t || p_s) (batch mean), or the release's probability-input kl_div."""
    if release:
        p_t = teacher_logits.softmax(-1)  # F.kl_div(p_s, p_t, reduction="mean") written out: mean of p_t (log p_t - p_s)
        return (torch.xlogy(p_t, p_t) - p_t * student_logits.softmax(-1)).mean()
    return kd_kl_div(student_logits, teacher_logits)


def hard_sample_loss(student_logits: Tensor, teacher_logits: Tensor, release: bool = False) -> Tensor:
    """Adversarial term of the generator (CMI / Fast-Datafree): on the samples where student and teacher
    agree (same arg-max), push the generator towards disagreement, -mean(m * KL(p_t || p_s)).

    ``release``: -mean(m * sum_c p_s (log p_s - p_t)), the value of the released ``kl_div`` call
    with probabilities as input."""
    agree = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float()
    p_t = teacher_logits.softmax(-1)
    if release:
        p_s = student_logits.softmax(-1)
        per_sample = (p_s * (p_s.clamp_min(1e-12).log() - p_t)).sum(-1)
    else:
        per_sample = (p_t * (F.log_softmax(teacher_logits, -1) - F.log_softmax(student_logits, -1))).sum(-1)
    return -(agree * per_sample).mean()


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
