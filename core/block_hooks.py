"""Edit the residual stream of a transformer between its blocks with forward hooks.

Deep representation surgery (SurgeryV2) corrects the hidden states after every block. The released
code re-implements the open_clip forward by hand with sequence-first permutes, which silently
attends across images on batch-first models; here the real model runs unchanged and a forward hook
on each block returns the edited output. Removing the hooks restores the model exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

# (block index, hidden states (B, N, D)) -> edited hidden states
BlockEdit = Callable[[int, Tensor], Tensor]


# where timm ViTs, open_clip (visual) towers and Hugging Face CLIP vision models keep their blocks
BLOCK_PATHS = ("blocks", "transformer.resblocks", "visual.transformer.resblocks", "encoder.layers",
               "vision_model.encoder.layers")


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of residual blocks of a timm ViT, an open_clip visual tower or a Hugging Face CLIP vision model."""
    for path in BLOCK_PATHS:
        module: nn.Module | None = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0:
            return module  # type: ignore[return-value]
    raise TypeError(
        f"{type(model).__name__}: no transformer blocks found (looked for {', '.join(BLOCK_PATHS)}); SurgeryV2 "
        "(model.init_args.version: v2) needs a ViT as model.init_args.model, V1 does not"
    )


def _hook(index: int, edit: BlockEdit) -> Callable:
    def hook(module: nn.Module, inputs: tuple, output: Tensor | tuple) -> Tensor | tuple:
        if isinstance(output, tuple):  # Hugging Face layers return (hidden_states, *extras)
            return (edit(index, output[0]), *output[1:])
        return edit(index, output)

    return hook


@contextmanager
def edited_blocks(blocks: nn.ModuleList, edit: BlockEdit) -> Iterator[None]:
    """Within the context every block's output ``h_b`` is replaced by ``edit(b, h_b)``; hooks removed on exit."""
    handles = [block.register_forward_hook(_hook(i, edit)) for i, block in enumerate(blocks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def block_widths(model: nn.Module, blocks: nn.ModuleList, example: Tensor) -> tuple[list[int], int]:
    """Widths of every block's output and of the model's output, read from one forward of ``example``."""
    widths: list[int] = []

    def record(index: int, hidden: Tensor) -> Tensor:
        widths.append(hidden.shape[-1])
        return hidden

    with edited_blocks(blocks, record):
        out = model(example)
    return widths, out.shape[-1]
