"""Embedding-space gender bias: a logistic probe on the conditioning a text encoder hands the UNet.

The probe is fitted on explicitly gendered prompts (label known) and read on neutral profession
prompts: P(male | neutral prompt) - 0.5 is the text-side proxy of the image-level bias (method notes
s. 6.1). The conditioning is the encoder's last hidden state mean-pooled over real tokens, computed
under whatever hooks are active, so the same function measures a prompt before and after debiasing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from core.text_layers import pool_tokens


@torch.no_grad()
def conditioning(encoder: nn.Module, tokenizer: Any, prompts: Sequence[str], batch_size: int = 256) -> Tensor:
    """(N, d) mean-pooled last hidden states of ``prompts`` padded to ``tokenizer.model_max_length``."""
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[start:start + batch_size]), padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt")
        hidden = encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask)[0]
        out.append(pool_tokens(hidden, enc.attention_mask))
    return torch.cat(out)


class GenderProbe:
    """Standardised logistic regression (scikit-learn) from pooled conditioning to P(male)."""

    def __init__(self, features: Tensor, male: Tensor, c: float = 1.0) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
        self.model.fit(features.double().numpy(), male.numpy())

    def p_male(self, features: Tensor) -> np.ndarray:
        return self.model.predict_proba(features.double().numpy())[:, 1]


def bias_of(p_male: np.ndarray | Tensor | float) -> float:
    """|P(male) - 0.5| scaled to [0, 1] (0: balanced; 1: always one gender)."""
    return float(2 * abs(float(np.mean(p_male)) - 0.5))
