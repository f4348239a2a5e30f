"""core.block_hooks: edits land after every block, removal restores the model exactly."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from core.block_hooks import block_widths, edited_blocks, find_blocks


def vit(depth: int = 2, width: int = 24) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, in_chans=1, num_classes=12,
                             embed_dim=width, depth=depth, num_heads=2).eval()


def test_hooks_edit_every_block_and_are_removed_exactly() -> None:
    model, x = vit(), torch.randn(3, 1, 16, 16)
    before = model(x)
    seen = []

    def edit(index: int, hidden: torch.Tensor) -> torch.Tensor:
        seen.append((index, tuple(hidden.shape)))
        return hidden + 1.0

    with edited_blocks(model.blocks, edit):
        edited = model(x)
    assert seen == [(0, (3, 5, 24)), (1, (3, 5, 24))]  # batch-first: 4 patches + CLS
    assert not torch.allclose(edited, before)
    assert all(not block._forward_hooks for block in model.blocks)
    assert torch.equal(model(x), before)


def test_hooks_are_removed_when_the_forward_raises() -> None:
    model = vit()

    def fail(index: int, hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), edited_blocks(model.blocks, fail):
        model(torch.randn(1, 1, 16, 16))
    assert all(not block._forward_hooks for block in model.blocks)


def test_hook_edit_equals_a_hand_written_forward() -> None:
    model, x = vit(depth=3), torch.randn(2, 1, 16, 16)
    shift = [torch.randn(24) for _ in range(3)]
    with edited_blocks(model.blocks, lambda i, h: h * 0.5 + shift[i]):
        hooked = model(x)
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for i, block in enumerate(model.blocks):
        h = block(h) * 0.5 + shift[i]
    reference = model.forward_head(model.norm(h))
    torch.testing.assert_close(hooked, reference)


def test_tuple_outputs_are_edited_in_their_first_element() -> None:
    class Layer(nn.Module):
        def forward(self, x):
            return x * 2, "extra"

    layers = nn.ModuleList([Layer()])
    with edited_blocks(layers, lambda i, h: h + 1):
        out = layers[0](torch.ones(2))
    assert torch.equal(out[0], torch.full((2,), 3.0)) and out[1] == "extra"


@pytest.mark.parametrize("depth,width", [(2, 24), (3, 32)])
def test_widths_and_blocks_are_read_from_the_model(depth: int, width: int) -> None:
    model = vit(depth, width)
    assert find_blocks(model) is model.blocks
    widths, out = block_widths(model, model.blocks, torch.zeros(1, 1, 16, 16))
    assert widths == [width] * depth and out == 12


def test_find_blocks_rejects_models_without_blocks() -> None:
    with pytest.raises(TypeError, match="no transformer blocks found"):
        find_blocks(nn.Linear(2, 2))
