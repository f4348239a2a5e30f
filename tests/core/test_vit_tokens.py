"""Token-subset forward of timm ViTs against the dense forward and naive attention."""

from __future__ import annotations

import pytest
import timm
import torch

from core import vit_tokens


def tiny_vit(name: str = "vit_tiny_patch16_224", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, num_classes=5, depth=2, **kwargs)
    return model.eval()


def random_index(batch: int, keep: int, n: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=gen)[:keep].sort().values for _ in range(batch)])


@pytest.mark.parametrize(
    "name,kwargs",
    [("vit_tiny_patch16_224", {}), ("deit_tiny_distilled_patch16_224", {}), ("vit_tiny_patch16_224", {"reg_tokens": 2})],
    ids=["cls", "cls+dist", "cls+registers"],
)
def test_keep_all_equals_dense(name: str, kwargs: dict) -> None:
    model = tiny_vit(name, **kwargs)
    x = torch.randn(3, 3, 32, 32)
    dense = model(x)
    all_index = torch.arange(16).repeat(3, 1)
    for index in (None, all_index):
        logits, _ = vit_tokens.forward_kept(model, x, index)
        torch.testing.assert_close(logits, dense, rtol=1e-5, atol=1e-5)


def test_subset_equals_dense_forward_with_dropped_keys_masked() -> None:
    """Dropping tokens == a dense forward in which nobody may attend to the dropped tokens."""
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    index = random_index(2, 6)
    logits, _ = vit_tokens.forward_kept(model, x, index)
    keep = torch.zeros(2, 17, dtype=torch.bool)
    keep[:, 0] = True
    keep[torch.arange(2)[:, None], index + 1] = True
    attn_mask = keep[:, None, None, :].expand(2, 1, 17, 17)
    tokens = vit_tokens.embed_tokens(model, x)
    for block in model.blocks:
        tokens = block(tokens, attn_mask=attn_mask)
    reference = model.forward_head(model.norm(tokens))
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)


def test_blocks_really_run_on_fewer_tokens() -> None:
    model = tiny_vit()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    vit_tokens.forward_kept(model, torch.randn(2, 3, 32, 32), random_index(2, 5))
    assert seen == [6]  # CLS + 5 patches


def test_cls_attention_matches_naive_attention() -> None:
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    index = random_index(2, 9)
    _, scores = vit_tokens.forward_kept(model, x, index, return_cls_attention=True)
    tokens = vit_tokens.gather_patches(vit_tokens.embed_tokens(model, x), index, 1)
    tokens = model.blocks[0](tokens)
    block = model.blocks[1]
    h = block.norm1(tokens)
    heads, d = block.attn.num_heads, block.attn.head_dim
    q, k, _ = (t.reshape(2, 10, heads, d).transpose(1, 2) for t in block.attn.qkv(h).chunk(3, dim=-1))
    probs = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)  # full (B, H, N, N) attention
    torch.testing.assert_close(scores, probs[:, :, 0, 1:].mean(1), rtol=1e-5, atol=1e-6)
    assert scores.shape == (2, 9)


def test_ce_gradient_is_zero_on_dropped_patches() -> None:
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    index = random_index(2, 4)
    logits, _ = vit_tokens.forward_kept(model, x, index)
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2])).backward()
    kept = vit_tokens.patch_mask_to_pixels(index, (4, 4), 8).expand_as(x)
    assert x.grad[~kept].abs().max() == 0
    assert x.grad[kept].abs().max() > 0


def test_top_patches_composes_with_current_index() -> None:
    current = torch.tensor([[2, 5, 7, 11], [0, 1, 3, 15]])
    scores = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.5, 0.1, 0.2, 0.9]])
    assert vit_tokens.top_patches(scores, 2, current).tolist() == [[5, 7], [0, 15]]
    with pytest.raises(ValueError, match="cannot keep 5 of 4"):
        vit_tokens.top_patches(scores, 5, current)


@pytest.mark.parametrize("shift", [(8, 0), (-16, 8), (24, -8), (0, 0)])
@pytest.mark.parametrize("flip", [False, True])
def test_remap_follows_rolled_and_flipped_content(shift: tuple[int, int], flip: bool) -> None:
    x = torch.randn(2, 3, 32, 32)
    index = random_index(2, 5)
    moved = torch.roll(x, shifts=shift, dims=(2, 3))
    moved = moved.flip(3) if flip else moved
    new = vit_tokens.remap_rolled_flipped(index, (4, 4), 8, shift, flip)

    def patch(img: torch.Tensor, pos: int) -> torch.Tensor:
        r, c = divmod(pos, 4)
        return img[:, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8]

    for b in range(2):
        for old, pos in zip(index[b].tolist(), new[b].tolist()):
            expected = patch(x[b], old).flip(2) if flip else patch(x[b], old)
            torch.testing.assert_close(patch(moved[b], pos), expected)


@pytest.mark.parametrize("shift,expected", [(3, 0), (4, 1), (11, 1), (12, 2), (-3, 0), (-4, 0), (-5, -1), (-12, -1), (-13, -2)])
def test_fractional_shift_rounds_to_nearest_patch(shift: int, expected: int) -> None:
    # floor(shift / 8 + 1/2): the release's floor-division rounding, half-way rounds up
    index = torch.tensor([[0]])
    new = vit_tokens.remap_rolled_flipped(index, (1, 4), 8, (0, shift), False)
    assert new.item() == expected % 4


def test_forward_masked_groups_rows_by_kept_count() -> None:
    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, [1, 2, 3]] = True
    mask[1] = True
    mask[2, [0, 5, 9, 10, 14]] = True
    out = vit_tokens.forward_masked(model, x, mask)
    for b in range(3):
        idx = mask[b].nonzero().T
        ref, _ = vit_tokens.forward_kept(model, x[b : b + 1], idx)
        torch.testing.assert_close(out[b : b + 1], ref, rtol=1e-5, atol=1e-5)


def test_patch_mask_to_pixels() -> None:
    mask = vit_tokens.patch_mask_to_pixels(torch.tensor([[0, 5]]), (4, 4), 8)
    assert mask.shape == (1, 1, 32, 32) and mask.sum() == 2 * 64
    assert mask[0, 0, :8, :8].all() and mask[0, 0, 8:16, 8:16].all() and not mask[0, 0, :8, 8:16].any()


def test_non_vit_is_rejected_with_the_config_key() -> None:
    cnn = timm.create_model("resnet18", pretrained=False, num_classes=5)
    with pytest.raises(TypeError, match="model.init_args.teacher: sparse token computation needs a timm VisionTransformer"):
        vit_tokens.require_vit(cnn, "model.init_args.teacher")


@pytest.mark.parametrize(
    "name,kwargs",
    [("vit_tiny_patch16_224", {}), ("deit_tiny_distilled_patch16_224", {}), ("vit_tiny_patch16_224", {"reg_tokens": 2}),
     ("vit_tiny_patch16_224", {"no_embed_class": True}), ("vit_tiny_patch16_224", {"dynamic_img_size": True})],
    ids=["cls", "cls+dist", "registers", "no_embed_class", "dynamic (fallback)"],
)
def test_kept_patch_embedding_equals_gathering_the_dense_embedding(name: str, kwargs: dict) -> None:
    model = tiny_vit(name, **kwargs)
    x, index = torch.randn(2, 3, 32, 32), random_index(2, 7)
    dense = vit_tokens.gather_patches(vit_tokens.embed_tokens(model, x), index, model.num_prefix_tokens)
    torch.testing.assert_close(vit_tokens.embed_kept_tokens(model, x, index), dense, rtol=1e-5, atol=1e-6)
    assert (vit_tokens._linear_patch_projection(model) is None) == bool(kwargs.get("dynamic_img_size"))
