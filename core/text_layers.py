"""Token-level residual features of a transformer text encoder at one layer (read and edited by hooks).

Hugging Face encoder layers return a bare tensor (transformers 5) or a tuple whose first element is the
hidden state (older versions, CLIP with attentions); :func:`hidden_of` / :func:`with_hidden` handle both,
so one hook works on CLIP (``text_model.encoder.layers``) and BERT/MiniLM (``encoder.layer``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

LAYER_PATHS = ("text_model.encoder.layers", "encoder.layers", "encoder.layer", "transformer.layers")


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layer list of a CLIP/BERT-style text encoder."""
    for path in LAYER_PATHS:
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"{type(model).__name__}: no transformer layer list found (tried {', '.join(LAYER_PATHS)})")


def layer_module(model: nn.Module, layer: int, key: str = "model.init_args.layer") -> nn.Module:
    """Layer ``layer`` (0-based; negative counts from the end) of the encoder; a clear error when out of range."""
    layers = encoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"{key}={layer}: the text encoder has {len(layers)} layers (use 0..{len(layers) - 1})")
    return layers[layer]


def hidden_of(output: Tensor | tuple) -> Tensor:
    return output if isinstance(output, Tensor) else output[0]


def with_hidden(output: Tensor | tuple, hidden: Tensor) -> Tensor | tuple:
    """``output`` with its hidden state replaced, in the same container type."""
    return hidden if isinstance(output, Tensor) else (hidden, *output[1:])


@contextmanager
def capture_layer(model: nn.Module, layer: int) -> Iterator[list[Tensor]]:
    """Collect the output hidden state (B, T, d) of ``layer`` on every forward inside the block."""
    seen: list[Tensor] = []
    handle = layer_module(model, layer).register_forward_hook(lambda m, i, out: seen.append(hidden_of(out)))
    try:
        yield seen
    finally:
        handle.remove()


@torch.no_grad()
def layer_features(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, layer: int) -> Tensor:
    """(B, T, d) residual features of ``layer`` for one tokenised batch (the same site the edit hooks)."""
    with capture_layer(model, layer) as seen:
        model(input_ids=input_ids, attention_mask=attention_mask)
    return seen[-1]


def pool_tokens(features: Tensor, attention_mask: Tensor, pooling: str = "mean") -> Tensor:
    """(B, T, d) -> (B, d): mean over non-padding tokens (``mean``), all positions (``all``) or the first
    token (``first``: CLS for BERT)."""
    if pooling == "mean":
        mask = attention_mask.to(features.dtype)[..., None]
        return (features * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    if pooling == "all":
        return features.mean(1)
    if pooling == "first":
        return features[:, 0]
    raise ValueError(f"pooling={pooling!r}: use mean, all or first")
