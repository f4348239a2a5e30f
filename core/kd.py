"""Knowledge-distillation losses shared by the methods that distil a teacher into a student."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kd_kl_div(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Hinton's distillation loss: KL(softmax(t / T) || softmax(s / T)) * T^2, averaged over the batch.

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al., 2015).
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2
