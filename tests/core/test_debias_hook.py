"""Debias hook: only the conditional branch, with/without CFG, tensor/tuple layers, SDXL, lambda = 0, banks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.bias_directions import DirectionBank, bank_from_deltas, class_mean_difference, keep_top_latents
from core.debias_hook import DebiasHook, EncoderSite, edit_hidden, pipeline_sites
from core.text_layers import layer_module


def clip_parts(width: int = 32, seed: int = 0, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in list(bytes_to_unicode().values()) + [c + "</w>" for c in bytes_to_unicode().values()]:
        vocab.setdefault(c, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    encoder = cls(CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                                 num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=32, bos_token_id=0,
                                 eos_token_id=1, pad_token_id=1, projection_dim=width)).eval()
    return encoder, tokenizer


@pytest.fixture(scope="module")
def sd_pipe():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    encoder, tokenizer = clip_parts()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bank_for(width: int, seed: int = 0, fallback: bool = True) -> DirectionBank:
    g = torch.Generator().manual_seed(seed)
    return DirectionBank({"nurse": torch.randn(width, generator=g), "pilot": torch.randn(width, generator=g)},
                         torch.randn(width, generator=g) if fallback else None, torch.randn(width, generator=g) * 0.1)


def encode(pipe, prompt: str, cfg: bool):
    return pipe.encode_prompt(prompt, "cpu", 1, cfg, negative_prompt=None)


def test_edit_matches_the_naive_projection() -> None:
    h, u, c = torch.randn(2, 5, 4), torch.nn.functional.normalize(torch.randn(2, 4), dim=1), torch.randn(4)
    out = edit_hidden(h, u, torch.tensor([1.0, 0.0]), torch.ones(2), c, 0.7, "project")
    naive = h[0] - 0.7 * ((h[0] - c) @ u[0])[:, None] * u[0]
    assert torch.allclose(out[0], naive, atol=1e-6) and torch.equal(out[1], h[1])
    full = edit_hidden(h, u, torch.ones(2), torch.ones(2), c, 1.0, "project")
    assert torch.allclose(((full - c) * u[:, None]).sum(-1), torch.zeros(2, 5), atol=1e-5)  # lambda 1: removed


@pytest.mark.parametrize("negate", [False, True])
def test_only_the_conditional_branch_changes_unless_asked(sd_pipe, negate: bool) -> None:
    sites = pipeline_sites(sd_pipe, 1)
    cond0, uncond0 = encode(sd_pipe, "a photo of a nurse", True)
    with DebiasHook(sites, bank_for(32), 1.0, also_negate_uncond=negate)("a photo of a nurse"):
        cond1, uncond1 = encode(sd_pipe, "a photo of a nurse", True)
        no_cfg, _ = encode(sd_pipe, "a photo of a nurse", False)
    assert not torch.allclose(cond0, cond1, atol=1e-4)
    assert torch.allclose(cond1, no_cfg)  # without CFG the (only) branch is edited the same way
    assert torch.equal(uncond0, uncond1) != negate
    after, _ = encode(sd_pipe, "a photo of a nurse", True)
    assert torch.equal(after, cond0)  # hooks removed on exit


def test_lambda_zero_images_are_bit_exact_and_lambda_one_differs(sd_pipe) -> None:
    def images(strength: float | None) -> torch.Tensor:
        kwargs = dict(num_inference_steps=2, height=16, width=16, output_type="pt",
                      generator=torch.Generator().manual_seed(0))
        if strength is None:
            return sd_pipe("a photo of a pilot", **kwargs).images
        with DebiasHook(pipeline_sites(sd_pipe, 1), bank_for(32), strength)("a photo of a pilot"):
            return sd_pipe("a photo of a pilot", **kwargs).images

    plain = images(None)
    assert torch.equal(images(0.0), plain)
    assert not torch.equal(images(1.0), plain)


class TupleLayer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tanh(self.linear(h)), torch.zeros(()))


class TupleEncoder(nn.Module):
    """An encoder whose layers return tuples (older transformers) and reads ``input_ids`` by keyword."""

    def __init__(self, vocab: int = 600, width: int = 8) -> None:
        super().__init__()
        self.config = type("Config", (), {"hidden_size": width})()
        self.embed = nn.Embedding(vocab, width)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([TupleLayer(width) for _ in range(2)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = self.embed(input_ids)
        for layer in self.encoder.layers:
            h = layer(h)[0]
        return (h,)


def test_tuple_layer_outputs_are_edited_in_place_of_their_hidden_state() -> None:
    _, tokenizer = clip_parts()
    encoder = TupleEncoder()
    bank = bank_for(8)
    ids = tokenizer(["a nurse", ""], padding="max_length", max_length=32, return_tensors="pt").input_ids
    seen = []
    with DebiasHook([EncoderSite(encoder, tokenizer, 0)], bank, 1.0)(["a nurse"]):
        handle = layer_module(encoder, 0).register_forward_hook(lambda m, i, out: seen.append(out))  # runs after
        encoder(input_ids=ids)
    handle.remove()
    hidden = layer_module(encoder, 0)(encoder.embed(ids))[0]
    u = bank.directions["nurse"]
    expected = hidden[0] - ((hidden[0] - bank.origin) @ u)[:, None] * u
    assert isinstance(seen[-1], tuple) and torch.allclose(seen[-1][0][0], expected, atol=1e-5)
    assert torch.allclose(seen[-1][0][1], hidden[1])  # the "" row is not a conditional prompt


def test_sdxl_shaped_pipeline_edits_each_encoder_with_its_slice() -> None:
    from diffusers import StableDiffusionXLPipeline

    enc1, tok1 = clip_parts(16, 0)
    enc2, tok2 = clip_parts(24, 1, projection=True)
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=enc1, text_encoder_2=enc2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=None, scheduler=None)
    bank = bank_for(40)
    sites = pipeline_sites(pipe, [1, 1])
    before = pipe.encode_prompt("a pilot", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    with DebiasHook(sites, bank, 1.0)("a pilot"):
        after = pipe.encode_prompt("a pilot", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    cond0, uncond0, cond1, uncond1 = before[0], before[1], after[0], after[1]
    assert cond1.shape[-1] == 40 and not torch.allclose(cond0[..., :16], cond1[..., :16], atol=1e-4)
    assert not torch.allclose(cond0[..., 16:], cond1[..., 16:], atol=1e-4)
    assert torch.equal(uncond0, uncond1)  # zeroed (force_zeros_for_empty_prompt) or untouched
    with pytest.raises(ValueError, match="dimension 32 but the text encoder"):
        DebiasHook(sites, bank_for(32), 1.0)


def test_saved_and_reloaded_bank_gives_the_same_edit(sd_pipe, tmp_path) -> None:
    bank = bank_for(32)
    back = DirectionBank.load(bank.save(tmp_path / "bank.safetensors"))
    sites = pipeline_sites(sd_pipe, 2)
    outs = []
    for b in (bank, back):
        with DebiasHook(sites, b, 0.8, mode="subtract")(["a pilot", "a photo of a cook"]):
            outs.append(encode(sd_pipe, ["a pilot", "a photo of a cook"], False)[0])
    assert torch.equal(outs[0], outs[1]) and back.professions == bank.professions


def test_bad_input_gives_clear_errors(sd_pipe) -> None:
    sites = pipeline_sites(sd_pipe, 1)
    with pytest.raises(ValueError, match="fallback"), DebiasHook(sites, bank_for(32, fallback=False), 1.0)("a cook"):
        pass
    with pytest.raises(ValueError, match="layer=7: the text encoder has 3 layers"):
        DebiasHook(pipeline_sites(sd_pipe, 7), bank_for(32), 1.0)
    with pytest.raises(ValueError, match="text encoder"):
        DebiasHook(sites, bank_for(12), 1.0)
    with pytest.raises(ValueError, match="mode='steer'"):
        DebiasHook(sites, bank_for(32), 1.0, mode="steer")


def test_explicitly_gendered_prompts_are_left_as_asked(sd_pipe) -> None:
    sites = pipeline_sites(sd_pipe, 1)
    plain = encode(sd_pipe, "a photo of a female nurse", False)[0]
    with DebiasHook(sites, bank_for(32), 1.0)("a photo of a female nurse"):
        assert torch.equal(encode(sd_pipe, "a photo of a female nurse", False)[0], plain)
    with DebiasHook(sites, bank_for(32), 1.0, keep_words=())("a photo of a female nurse"):
        assert not torch.equal(encode(sd_pipe, "a photo of a female nurse", False)[0], plain)


def test_bank_profession_lookup_and_direction_estimate() -> None:
    codes = torch.tensor([[2.0, 0.0, 1.0], [0.0, 2.0, 1.0], [4.0, 0.0, 0.0], [0.0, 0.0, 4.0]])
    gender, prof = torch.tensor([1, 0, 1, 0]), torch.tensor([0, 0, 1, 1])
    delta = class_mean_difference(codes, gender, prof, 2)
    assert torch.equal(delta, torch.tensor([[2.0, -2.0, 0.0], [4.0, 0.0, -4.0]]))
    assert torch.equal(keep_top_latents(torch.tensor([[1.0, -3.0, 2.0]]), 1), torch.tensor([[0.0, -3.0, 0.0]]))
    basis = torch.eye(3)[[2, 0, 1]]  # latent j decodes to axis basis[j]
    bank = bank_from_deltas(delta, basis, ["nurse", "nurse practitioner"], torch.zeros(3))
    assert torch.allclose(bank.directions["nurse"], torch.tensor([-2.0, 0.0, 2.0]) / 8**0.5)
    assert bank.profession_of("Two Nurse Practitioners at work") == "nurse practitioner"
    assert bank.profession_of("a photo of a nurse") == "nurse" and bank.profession_of("a cook") is None


def test_content_positions_leave_special_and_padding_tokens_alone() -> None:
    _, tokenizer = clip_parts()
    encoder = TupleEncoder()
    ids = tokenizer(["a nurse"], padding="max_length", max_length=32, return_tensors="pt").input_ids
    plain = encoder(input_ids=ids)[0]
    with DebiasHook([EncoderSite(encoder, tokenizer, 1)], bank_for(8), 1.0, positions="content")(["a nurse"]):
        edited = encoder(input_ids=ids)[0]
    special = torch.isin(ids[0], torch.tensor(tokenizer.all_special_ids))
    assert torch.equal(edited[0, special], plain[0, special]) and not torch.allclose(edited[0, ~special], plain[0, ~special])
