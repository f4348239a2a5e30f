"""Zero-shot heads: CLIP's recipe against a hand-written loop, and the loader's errors."""

from __future__ import annotations

import pytest
import torch

from core.zero_shot_head import clip_text_encoder, zero_shot_head


def fake_encoder(prompts: list[str]) -> torch.Tensor:
    """A deterministic 'text tower': embeddings seeded by the prompt text, of varied norms."""
    out = []
    for p in prompts:
        g = torch.Generator().manual_seed(sum(map(ord, p)) * 31 + len(p))
        out.append(torch.randn(6, generator=g) * (1 + len(p) % 3))
    return torch.stack(out)


def test_head_matches_a_per_class_loop() -> None:
    names, templates = ["cat", "dog", "sea lion"], ["a photo of a {}.", "a {} in the wild.", "{}"]
    head = zero_shot_head(fake_encoder, names, templates, logit_scale=50.0)
    for c, name in enumerate(names):
        total = torch.zeros(6)
        for t in templates:
            e = fake_encoder([t.replace("{}", name)])[0]
            total += e / e.norm()
        expected = 50.0 * total / total.norm()
        assert torch.allclose(head[c], expected, atol=1e-5)
    assert head.shape == (3, 6) and torch.allclose(head.norm(dim=1), torch.full((3,), 50.0))


def test_bad_templates_and_empty_classes_are_named() -> None:
    with pytest.raises(ValueError, match="templates"):
        zero_shot_head(fake_encoder, ["cat"], ["a photo"])
    with pytest.raises(ValueError, match="class names"):
        zero_shot_head(fake_encoder, [], ["a {}"])


def test_missing_text_encoder_names_the_key(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model.init_args.text_encoder"):
        clip_text_encoder(str(tmp_path / "no_clip"))
