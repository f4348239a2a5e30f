"""Per-sequence token-mean negative log-likelihood of the response tokens of a causal LM.

Instruction tuning scores only the answer: prompt positions carry the label ``-100`` and are masked.
Sample re-weighting (Bayesian Data Scheduler, SEAL, data selection) needs one loss *per sequence*,
not the batch mean that ``model(..., labels=...)`` returns; the release's
``BatchCrossEntropyLoss(sequence_reduce="mean")`` is this function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
"""Label of the positions that do not count (prompt and padding)."""


def sequence_nll(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Token-mean next-token NLL of every sequence over its unmasked label positions.

    Args:
        logits: (B, T, V) next-token logits of a causal LM for inputs of length T.
        labels: (B, T) token ids aligned with the inputs; ``ignore_index`` marks positions that do
            not count. The logit at position t predicts the label at position t + 1.
        ignore_index: label value of masked positions.

    Returns:
        (B,) float32 losses. A sequence without any scored token gets loss 0 (and no gradient).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree in (B, T)")
    shifted_logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != ignore_index
    token_nll = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        targets.clamp_min(0).reshape(-1),
        reduction="none",
    ).view_as(targets)
    counts = mask.sum(1)
    return (token_nll * mask).sum(1) / counts.clamp_min(1).to(token_nll.dtype)


def mask_prompt(input_ids: Tensor, prompt_lengths: Tensor, attention_mask: Tensor) -> Tensor:
    """Labels equal to ``input_ids`` with prompt and padding positions set to ``IGNORE_INDEX``.

    Args:
        input_ids: (B, T) right-padded token ids (prompt, then response).
        prompt_lengths: (B,) number of prompt tokens at the start of each row.
        attention_mask: (B, T) 1 on real tokens, 0 on padding.

    Returns:
        (B, T) labels.
    """
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    keep = (positions >= prompt_lengths.unsqueeze(1)) & attention_mask.bool()
    return input_ids.masked_fill(~keep, IGNORE_INDEX)
