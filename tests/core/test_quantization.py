"""Tests for core/quantization.py: PSAQ-ViT min/max fake quantisation of timm ViTs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch
from torch import nn

from core.quantization import (
    QuantAct,
    QuantAttention,
    QuantBlock,
    QuantConv2d,
    QuantLinear,
    act_qparams,
    calibration,
    fake_quant_act,
    fake_quant_weight,
    quantize_vit,
)


def _tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10, depth=2
    ).eval()
    # timm initialises the CLS token at ~1e-6, far below the patch tokens; a per-tensor range then
    # rounds it to zero and LayerNorm blows that up. A trained model has a real CLS token.
    nn.init.normal_(model.cls_token, std=1.0)
    return model


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return _tiny_vit()


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=g)
    calib = torch.cat([x, torch.randn(8, 3, 32, 32, generator=g)])
    return x, calib


def _calibrated(model: nn.Module, calib: torch.Tensor, weight_bits: int, act_bits: int) -> nn.Module:
    qmodel = quantize_vit(model, weight_bits, act_bits)
    with torch.no_grad(), calibration(qmodel):
        qmodel(calib)
    return qmodel


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 2, 2)])
def test_weight_fake_quant_matches_naive_per_row_loop(bits, shape):
    w = torch.randn(shape)
    w[0] *= 10.0  # rows with very different ranges: per-row, not per-tensor, scales
    expected = torch.empty_like(w)
    for c in range(w.shape[0]):
        row = w[c]
        scale = max(abs(row.min().item()), abs(row.max().item())) / (2 ** (bits - 1) - 1)
        expected[c] = torch.clamp(torch.round(row / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale
    got = fake_quant_weight(w, bits)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    for c in range(w.shape[0]):
        assert got[c].unique().numel() <= 2**bits - 1


def test_per_tensor_weights_share_one_scale_and_quantize_vit_applies_it():
    w = torch.randn(6, 5)
    w[0] *= 10.0
    scale = w.abs().max() / 7
    expected = torch.clamp(torch.round(w / scale), -8, 7) * scale
    torch.testing.assert_close(fake_quant_weight(w, 4, per_channel=False), expected, rtol=0, atol=1e-6)
    assert fake_quant_weight(w, 4, per_channel=False)[1:].unique().numel() < fake_quant_weight(w, 4)[1:].unique().numel()
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, num_classes=3,
                            depth=1, embed_dim=16, num_heads=2)
    qmodel = quantize_vit(vit, weight_bits=4, weight_granularity="tensor")
    fc = qmodel.blocks[0].mlp.fc1
    torch.testing.assert_close(fc.quant_weight(), fake_quant_weight(fc.weight, 4, per_channel=False))
    with pytest.raises(ValueError, match="weight_granularity"):
        quantize_vit(vit, weight_granularity="row")


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_activation_grid_has_2_pow_k_values_and_round_trips(bits):
    x_min, x_max = torch.tensor(-1.3), torch.tensor(2.1)
    x = torch.randn(10_000) * 3  # also far outside the range: clamps to the end points
    out = fake_quant_act(x, x_min, x_max, bits)
    assert out.unique().numel() <= 2**bits
    scale, zero = act_qparams(x_min, x_max, bits)
    grid = (torch.arange(2**bits, dtype=torch.float32) - zero) * scale
    assert torch.equal(fake_quant_act(grid, x_min, x_max, bits), grid)
    assert torch.equal(fake_quant_act(out, x_min, x_max, bits), out)  # idempotent
    assert out.min() >= x_min - scale and out.max() <= x_max + scale


def test_quant_act_records_global_min_max_over_batches_then_freezes():
    qa = QuantAct(8)
    a, b = torch.randn(3, 7) * 2 + 1, torch.randn(5, 7) - 1
    with calibration(qa):
        qa(a)
        qa(b)
    assert qa.x_min.item() == torch.cat([a.flatten(), b.flatten()]).min().item()
    assert qa.x_max.item() == torch.cat([a.flatten(), b.flatten()]).max().item()
    qa(torch.randn(4) * 100)  # frozen: no longer recorded
    assert qa.x_max.item() == torch.cat([a.flatten(), b.flatten()]).max().item()
    with calibration(qa):  # a new calibration starts from empty ranges
        qa(torch.tensor([0.5, 0.25]))
    assert (qa.x_min.item(), qa.x_max.item()) == (0.25, 0.5)


def test_bits_error_ordering_w16a16_w8a8_w4a8(vit, images):
    x, calib = images
    with torch.no_grad():
        ref = vit(x)
        settings = [(16, 16), (8, 8), (4, 8)]
        err16, err8, err4 = (_rel_err(_calibrated(vit, calib, w, a)(x), ref) for w, a in settings)
    assert err16 < 1e-3
    assert err8 < 0.1
    assert err16 < err8 < err4


def test_structure_and_original_unchanged(vit, images):
    x, calib = images
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    with torch.no_grad():
        before = vit(x)
    qmodel = _calibrated(vit, calib, 4, 8)
    assert isinstance(qmodel, timm.models.vision_transformer.VisionTransformer)
    assert all(isinstance(b, QuantBlock) and isinstance(b.attn, QuantAttention) for b in qmodel.blocks)
    assert isinstance(qmodel.patch_embed.proj.conv, QuantConv2d)
    assert isinstance(qmodel.head.linear, QuantLinear)
    n_act = sum(isinstance(m, QuantAct) for m in qmodel.modules())
    assert n_act == 4 + 10 * len(qmodel.blocks)  # image, tokens, final norm, logits; 10 per block
    assert not any(isinstance(m, (QuantAct, QuantLinear, QuantConv2d)) for m in vit.modules())
    assert all(torch.equal(v, state[k]) for k, v in vit.state_dict().items())
    assert qmodel.blocks[0].attn.qkv.weight is not vit.blocks[0].attn.qkv.weight
    with torch.no_grad():
        torch.testing.assert_close(vit(x), before, rtol=0, atol=0)


def _piecewise(model: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    tokens = model._pos_embed(model.patch_embed(x))
    tokens = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return model.forward_head(model.norm(model.blocks(tokens)))


def test_token_subset_piecewise_forward(vit, images):
    x, calib = images
    qmodel = quantize_vit(vit, 8, 8)
    g = torch.Generator().manual_seed(2)
    cls = torch.zeros(1, dtype=torch.long)  # token 0 (CLS) always kept, 6 of 16 patches per image
    subset = torch.stack([torch.cat([cls, 1 + torch.randperm(16, generator=g)[:6]]) for _ in calib])
    with torch.no_grad(), calibration(qmodel):  # calibration on per-image token subsets works too
        _piecewise(qmodel, calib, subset)
    assert all(m.calibrated for m in qmodel.modules() if isinstance(m, QuantAct))
    with torch.no_grad(), calibration(qmodel):
        qmodel(calib)
    with torch.no_grad():
        full = qmodel(x)
        all_tokens = torch.arange(17).expand(len(x), -1)
        torch.testing.assert_close(_piecewise(qmodel, x, all_tokens), full, rtol=0, atol=0)
        sparse = _piecewise(qmodel, x, subset[: len(x)])
    assert sparse.shape == (4, 10) and not torch.allclose(sparse, full, atol=1e-3)
    q16 = quantize_vit(vit, 16, 16)  # per-tensor ranges hold for any sequence length
    with torch.no_grad(), calibration(q16):
        _piecewise(q16, calib, subset)
    with torch.no_grad():
        assert _rel_err(_piecewise(q16, x, subset[:4]), _piecewise(vit, x, subset[:4])) < 1e-3


def test_uncalibrated_use_raises(vit, images):
    qmodel = quantize_vit(vit)
    with pytest.raises(RuntimeError, match="calibrate the activation ranges first"):
        qmodel(images[0])
    with pytest.raises(ValueError, match="quantize_vit"), calibration(vit):
        pass


def test_calibrated_ranges_round_trip_state_dict(vit, images):
    x, calib = images
    qmodel = _calibrated(vit, calib, 8, 8)
    fresh = quantize_vit(vit, 8, 8)
    fresh.load_state_dict(qmodel.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), qmodel(x), rtol=0, atol=0)


def test_straight_through_gradient_reaches_input(vit, images):
    x, calib = images
    qmodel = _calibrated(vit, calib, 4, 8)
    x = x.clone().requires_grad_(True)
    qmodel(x).logsumexp(-1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert qmodel.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_bad_model_and_bits_raise(vit):
    with pytest.raises(TypeError, match="Sequential"):
        quantize_vit(nn.Sequential(nn.Linear(4, 4)))
    for bits in (1, 17):
        with pytest.raises(ValueError, match=r"\[2, 16\]"):
            quantize_vit(vit, weight_bits=bits)
        with pytest.raises(ValueError, match=r"\[2, 16\]"):
            quantize_vit(vit, act_bits=bits)


def test_distilled_deit_quantises_and_runs(images):
    x, calib = images
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             depth=2, num_classes=10).eval()
    nn.init.normal_(deit.cls_token, std=1.0)
    nn.init.normal_(deit.dist_token, std=1.0)
    q16, q8 = _calibrated(deit, calib, 16, 16), _calibrated(deit, calib, 8, 8)
    assert isinstance(q8.head_dist.quant, QuantAct)
    with torch.no_grad():
        ref = deit(x)
        assert _rel_err(q16(x), ref) < 1e-3
        assert q8(x).shape == (4, 10) and _rel_err(q8(x), ref) < 0.2


def test_calibration_records_the_float_networks_ranges(vit, images):
    # PSAQ-ViT and the SMI release record ranges with quantisation off; at W4/A4 the fake-quantised
    # network's logits lie far from the float ones, so a range recorded through it would differ.
    _, calib = images
    qmodel = _calibrated(vit, calib, 4, 4)
    with torch.no_grad():
        logits = vit(calib)
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(calib))))
    torch.testing.assert_close(qmodel.head.quant.x_min, logits.min())
    torch.testing.assert_close(qmodel.head.quant.x_max, logits.max())
    torch.testing.assert_close(qmodel.pos_drop.quant.x_max, tokens.max())
    assert all(m.enabled for m in qmodel.modules() if isinstance(m, (QuantLinear, QuantConv2d)))
    with torch.no_grad():
        assert _rel_err(qmodel(calib), logits) > 1e-2  # quantisation is back on after calibration


def test_frozen_weight_quantisation_is_cached_until_the_weight_changes():
    layer = QuantLinear(nn.Linear(6, 5), bits=4)
    layer.weight.requires_grad_(False)
    first = layer.quant_weight()
    assert layer.quant_weight() is first
    torch.testing.assert_close(first, fake_quant_weight(layer.weight, 4))
    with torch.no_grad():
        layer.weight.mul_(3.0)  # in-place update: the version counter moves
    torch.testing.assert_close(layer.quant_weight(), fake_quant_weight(layer.weight, 4))
    assert layer.quant_weight() is not first
