"""A frozen timm VisionTransformer with deep prompt tokens (VPT-Deep, Jia et al., ECCV 2022).

At every block ``l`` the prompt tokens ``P_l`` (B, m, D) are appended to the token sequence
``[CLS, patches]``, the block runs on ``[CLS, patches, P_l]`` and the ``m`` prompt outputs are
dropped, so the next block gets fresh prompts (not the previous block's transformed ones). Prompts
carry no position embedding, so where they sit in the sequence does not matter to self-attention.
The representation is the backbone's own pooled output (final LayerNorm, then [CLS] for ViT/DeiT).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from core.vit_tokens import embed_tokens


def require_prompt_vit(model: nn.Module, key: str) -> VisionTransformer:
    """Return ``model`` if prompts can be inserted into it (a timm VisionTransformer), else a TypeError."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"{key}: deep prompts need a timm VisionTransformer (vit_*/deit_* names), got "
            f"{type(model).__name__}; choose a ViT backbone"
        )
    return model


def prompted_features(vit: VisionTransformer, images: Tensor, prompts: Sequence[Tensor | None] | Tensor | None) -> Tensor:
    """Pooled features (B, D) of ``vit`` on ``images`` with ``prompts[l]`` (B, m_l, D) inserted at block ``l``.

    ``prompts`` is None (the plain backbone: equals ``vit.forward_head(vit.forward_features(x),
    pre_logits=True)``), or one entry per block, an entry being None for a block without prompts.
    """
    tokens = embed_tokens(vit, images)
    length = tokens.shape[1]
    for index, block in enumerate(vit.blocks):
        prompt = None if prompts is None else prompts[index]
        # the prompt outputs are discarded: every block sees its own fresh prompt tokens
        tokens = block(tokens) if prompt is None else block(torch.cat([tokens, prompt], dim=1))[:, :length]
    return vit.forward_head(vit.norm(tokens), pre_logits=True)
