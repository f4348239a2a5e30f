"""The open_clip -> timm converter on a tiny open_clip-shaped image tower built here (no weights downloaded)."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file

from core.open_clip_convert import convert_head, convert_tower, main

open_clip = pytest.importorskip("open_clip")
TIMM = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 12}


def tiny_tower() -> torch.nn.Module:
    torch.manual_seed(0)
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=4.0,
                             output_dim=12).eval()


@pytest.mark.parametrize("prefix", ["model.visual.", "visual.", ""])
def test_converted_tower_computes_the_same_embedding(prefix: str, tmp_path) -> None:
    tower = tiny_tower()
    state = {prefix + k: v for k, v in tower.state_dict().items()}
    if prefix:  # a whole CLIP / ImageEncoder state dict: its text-side leftovers are ignored
        state[prefix.replace("visual.", "") + "logit_scale"] = torch.tensor(4.6)
    converted = convert_tower(state, "vit_base_patch32_clip_224", TIMM)
    model = timm.create_model("vit_base_patch32_clip_224", pretrained=False, **TIMM).eval()
    model.load_state_dict(converted)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tower(x), rtol=1e-4, atol=1e-5)


def test_cli_writes_tower_and_head_and_rejects_wrong_input(tmp_path) -> None:
    torch.save({f"model.visual.{k}": v for k, v in tiny_tower().state_dict().items()}, tmp_path / "t.pt")
    head = {"weight": torch.randn(5, 12) * 100, "bias": torch.zeros(5)}
    torch.save(head, tmp_path / "h.pt")
    with pytest.raises(ValueError, match="lacks"):  # a tower of other depth than the named timm model
        convert_tower(torch.load(tmp_path / "t.pt", weights_only=True), "vit_base_patch32_clip_224", {**TIMM, "depth": 3})
    with pytest.raises(ValueError, match="not an open_clip image tower"):
        convert_tower({"a.weight": torch.zeros(1)}, "vit_base_patch32_clip_224", TIMM)
    with pytest.raises(ValueError, match="non-zero bias"):
        convert_head({"weight": torch.ones(2, 2), "bias": torch.ones(2)})
    import core.open_clip_convert as conv

    original = conv.convert_tower
    conv.convert_tower = lambda state, model: original(state, model, TIMM)  # the CLI builds the full-size model
    try:
        main(["--model", "vit_base_patch32_clip_224", "--tower", str(tmp_path / "t.pt"), "--head", str(tmp_path / "h.pt"),
              "--out", str(tmp_path / "out" / "SUN397.safetensors")])
    finally:
        conv.convert_tower = original
    assert torch.equal(load_file(str(tmp_path / "out" / "SUN397.head.safetensors"))["weight"], head["weight"])
    assert "blocks.1.attn.qkv.weight" in load_file(str(tmp_path / "out" / "SUN397.safetensors"))
