"""FSCIL metrics and prototypes against hand-computed values; the prompted ViT forward against timm's."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from core.fscil import class_means, fscil_metrics
from core.prompted_vit import prompted_features, require_prompt_vit


def test_session_accuracy_average_drop_and_harmonic_mean_on_hand_made_counts() -> None:
    # 3 sessions; base test set 10 images, sessions 1 and 2 have 5 each
    correct = torch.tensor([[9.0, 0, 0], [8, 2, 0], [7, 3, 1]])
    count = torch.tensor([10.0, 5, 5])
    m = fscil_metrics(correct, count)
    assert m["sessions"] == pytest.approx([0.9, 10 / 15, 11 / 20])
    assert m["avg"] == pytest.approx((0.9 + 10 / 15 + 11 / 20) / 3)
    assert m["pd"] == pytest.approx(0.9 - 11 / 20)
    assert m["old"] == pytest.approx([0.8, 0.7]) and m["new"] == pytest.approx([0.4, 0.4])
    assert m["hm"] == pytest.approx(2 * 0.7 * 0.4 / 1.1)
    assert m["hm_sessions"][0] == pytest.approx(2 * 0.8 * 0.4 / 1.2)
    assert math.isnan(fscil_metrics(correct[:1, :1], count[:1])["hm"])
    with pytest.raises(ValueError, match=r"\(T, T\)"):
        fscil_metrics(correct[:2], count)


def test_class_means_equal_a_per_class_loop_and_missing_classes_are_named() -> None:
    features, labels = torch.randn(30, 4), torch.arange(30) % 3
    classes = torch.tensor([2, 0])
    means = class_means(features, labels, classes)
    assert torch.allclose(means[0], features[labels == 2].mean(0), atol=1e-6)
    assert torch.allclose(means[1], features[labels == 0].mean(0), atol=1e-6)
    with pytest.raises(ValueError, match=r"classes \[5\]"):
        class_means(features, labels, torch.tensor([0, 5]))


def tiny_vit() -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=3,
                             num_heads=2, num_classes=0).eval()


def test_without_prompts_the_features_are_timms_and_prompts_reach_every_block_then_are_dropped() -> None:
    vit, images = tiny_vit(), torch.randn(2, 1, 8, 8)
    assert torch.allclose(prompted_features(vit, images, None), vit(images), atol=1e-6)
    prompts = [torch.randn(2, 3, 16) for _ in range(3)]
    inputs, outputs = [], []

    def record(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        inputs.append(args[0])
        outputs.append(output)

    hooks = [b.register_forward_hook(record) for b in vit.blocks]
    prompted_features(vit, images, prompts)
    for h in hooks:
        h.remove()
    length = 1 + 4  # CLS + 2x2 patches
    assert [x.shape[1] for x in inputs] == [length + 3] * 3
    for block in range(3):
        assert torch.equal(inputs[block][:, length:], prompts[block])  # fresh prompts at every block
    for block in range(2):  # the next block continues from the non-prompt outputs only
        assert torch.equal(inputs[block + 1][:, :length], outputs[block][:, :length])


def test_a_backbone_that_is_not_a_vit_is_refused_with_the_key() -> None:
    with pytest.raises(TypeError, match="model.init_args.backbone"):
        require_prompt_vit(torch.nn.Linear(2, 2), "model.init_args.backbone")
