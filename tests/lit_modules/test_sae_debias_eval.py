"""The paper settings' image evaluation (CLIP judge, SD pipeline from a local folder) and SDXL's two SAEs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from core.bias_directions import DirectionBank, concat_banks
from core.clip_judge import ClipJudge
from core.debias_hook import DebiasHook, pipeline_sites
from tests.core.test_debias_hook import clip_parts
from train import cli_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "sae_debias"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random CLIP-shaped model (16 px images) with a processor, saved as a local folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    _, tokenizer = clip_parts()
    folder = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_judge_matches_the_models_own_logits(tiny_clip: Path) -> None:
    from transformers import CLIPModel, CLIPProcessor

    judge = ClipJudge(str(tiny_clip))
    images = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    texts = ["a photo of a man", "a photo of a woman", "a nurse"]
    inputs = processor(text=texts, images=list(images), do_rescale=False, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image  # (3 images, 3 texts) = exp(logit_scale) * cos
    assert torch.allclose(judge.p_male(images), logits[:, :2].softmax(-1)[:, 0], atol=1e-5)
    cos = logits[:, 2] / model.logit_scale.exp()
    assert torch.allclose(judge.clip_score(images, ["a nurse"] * 3), 100 * cos.clamp_min(0), atol=1e-4)


def test_missing_clip_weights_name_the_key() -> None:
    with pytest.raises(FileNotFoundError, match="model.init_args.clip_model='/no/clip'"):
        ClipJudge("/no/clip")
    with pytest.raises(ValueError, match="model.init_args.clip_model is empty"):
        ClipJudge("")


def tiny_sd_folder(folder: Path) -> Path:
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
    StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=DDIMScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def paper_config_args(config: str, folder: Path, root: Path, layer: int = 1) -> list[str]:
    return ["fit", "--config", str(CONFIGS / config), f"--model.init_args.text_encoder={folder}",
            f"--model.init_args.layer={layer}", "--model.init_args.max_length=32", f"--data.init_args.tokenizer={folder}",
            "--data.init_args.max_length=32", "--trainer.max_steps=1", "--trainer.limit_val_batches=1",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={root}", "--trainer.logger=cli.csv_logger.CSVLogger",
            f"--trainer.logger.save_dir={root}", "--trainer.logger.name=run", "--trainer.logger.version=fixed"]


@pytest.mark.slow
def test_sd_config_evaluates_images_with_the_clip_judge(tiny_clip: Path, tmp_path: Path) -> None:
    folder = tiny_sd_folder(tmp_path / "sd")
    cli_main(paper_config_args("sd14.yaml", folder, tmp_path / "runs")
             + [f"--model.init_args.pipeline={folder}", f"--model.init_args.clip_model={tiny_clip}",
                "--model.init_args.eval_images=2", "--model.init_args.eval_steps=2"])
    rows = list(csv.DictReader((tmp_path / "runs" / "run" / "fixed" / "metrics.csv").open()))
    logged = {k: float(v) for row in rows for k, v in row.items() if k.startswith("test/clip") and v}
    for split in ("train", "heldout"):
        for row in ("none", "sae", "dense"):
            assert 0 <= logged[f"test/clip_bias_{split}_{row}"] <= 1 and logged[f"test/clip_score_{split}_{row}"] >= 0
    assert logged["test/clip_score_train_sae"] != logged["test/clip_score_train_none"]  # the edit reached the images


@pytest.mark.slow
def test_sdxl_trains_an_sae_per_encoder_and_edits_both(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from lit_modules.sae_debias_eval import pipeline_bank

    (enc1, tok1), (enc2, tok2) = clip_parts(16, 0), clip_parts(24, 1, projection=True)
    folder = tmp_path / "sdxl"
    for sub, part in (("text_encoder", enc1), ("tokenizer", tok1), ("text_encoder_2", enc2), ("tokenizer_2", tok2)):
        part.save_pretrained(folder / sub)
    banks = {}
    for config, name in (("sdxl.yaml", "clip_l"), ("sdxl_bigg.yaml", "bigg")):
        root = tmp_path / name
        cli_main(paper_config_args(config, folder, root) + ["--model.init_args.pipeline="])
        banks[name] = root / "run" / "fixed" / "banks"
    own_l, own_g = (DirectionBank.load(banks[n] / "sae.safetensors") for n in ("clip_l", "bigg"))
    assert own_l.dim == 16 and own_g.dim == 24  # each SAE read its own encoder
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=enc1, text_encoder_2=enc2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=None, scheduler=None)
    both = pipeline_bank(own_g, pipe, [1, 1], [str(banks["clip_l"]), ""], "sae")  # as sdxl_bigg.yaml
    l_only = pipeline_bank(own_l, pipe, [1, 1], ["", "none"], "sae")  # as sdxl.yaml
    assert torch.allclose(both.directions["nurse"][:16] / both.directions["nurse"][:16].norm(),
                          own_l.directions["nurse"], atol=1e-6)
    prompt = "a photo of a nurse"

    def cond(bank: DirectionBank | None) -> torch.Tensor:
        if bank is None:
            return pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)[0]
        with DebiasHook(pipeline_sites(pipe, [1, 1]), bank, 1.0)(prompt):
            return pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)[0]

    plain, edited, edited_l = cond(None), cond(both), cond(l_only)
    assert not torch.allclose(plain[..., :16], edited[..., :16], atol=1e-5)
    assert not torch.allclose(plain[..., 16:], edited[..., 16:], atol=1e-5)
    assert torch.allclose(edited_l[..., :16], edited[..., :16], atol=1e-5)  # same CLIP-L edit (up to rounding)
    assert torch.equal(edited_l[..., 16:], plain[..., 16:])  # a zero slice leaves bigG untouched
    with pytest.raises(ValueError, match="different professions"):
        concat_banks([own_l, DirectionBank({"pilot": torch.ones(24)})])
