"""SAE Debias through the CLI (both demo stages, tiny random BERT), its datamodules and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.bias_directions import DirectionBank
from core.topk_sae import TopKSAE
from datamodules.sae_debias import MALE_SHARE, TRAIN_PROFESSIONS, SAECorpusDataModule, gendered_corpus
from datamodules.sae_debias_images import BiasedCaptionsDataModule
from train import cli_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "sae_debias"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT with MiniLM's real tokenizer, saved as a local folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from core.packaged_models import resolve_model

    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model("minilm")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sae_run(tiny_bert, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sae_run")
    cli = cli_main(["fit", "--config", str(CONFIGS / "demo.yaml"), f"--model.init_args.text_encoder={tiny_bert}",
                    "--model.init_args.layer=1", f"--data.init_args.tokenizer={tiny_bert}",
                    "--trainer.fast_dev_run=2", "--trainer.logger=false", f"--trainer.default_root_dir={root}"])
    assert torch.allclose(cli.model.sae.W_dec.norm(dim=1), torch.ones(cli.model.sae.d_sae), atol=1e-5)
    return root


@pytest.mark.slow
def test_sae_stage_writes_the_saelens_sae_banks_and_picture(sae_run: Path) -> None:
    cfg = json.loads((sae_run / "sae" / "cfg.json").read_text())
    assert cfg["d_in"] == 32 and cfg["d_sae"] == 128 and cfg["hook_name"] == "layer.1"
    TopKSAE.load(sae_run / "sae")
    for name in ("sae", "dense", "sae_random"):
        bank = DirectionBank.load(sae_run / "banks" / f"{name}.safetensors")
        assert bank.professions == list(TRAIN_PROFESSIONS) and bank.fallback is not None and bank.dim == 32
    assert (sae_run / "probe_bias.png").stat().st_size > 0


@pytest.mark.slow
def test_t2i_stage_samples_with_and_without_the_bank(sae_run: Path, tiny_bert: Path, tmp_path: Path) -> None:
    cli_main(["fit", "--config", str(CONFIGS / "demo_t2i.yaml"), f"--model.init_args.text_encoder={tiny_bert}",
              f"--model.init_args.bank={sae_run / 'banks' / 'sae.safetensors'}", "--model.init_args.layer=1",
              "--model.init_args.sample_steps=2", "--model.init_args.samples_per_profession=1",
              "--data.init_args.samples=64", "--data.init_args.per_class=4", "--trainer.fast_dev_run=1",
              "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"])
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_layer_out_of_range_names_the_key(tiny_bert: Path) -> None:
    from lit_modules.sae_debias import SAEDebiasModule

    with pytest.raises(ValueError, match=r"model.init_args.layer=5: the text encoder has 2 layers"):
        SAEDebiasModule(text_encoder=str(tiny_bert), layer=5)
    with pytest.raises(FileNotFoundError, match="model.init_args.text_encoder='/no/such/model'"):
        SAEDebiasModule(text_encoder="/no/such/model")


def test_corpus_is_gender_balanced_per_profession_and_checks_names() -> None:
    rows = gendered_corpus(["nurse", "pilot"])
    for p in (0, 1):
        genders = [g for _, g, q in rows if q == p]
        assert genders.count(1) == genders.count(0) > 10
    assert any("female nurse" in t for t, g, _ in rows if g == 0)
    with pytest.raises(ValueError, match="data.init_args.professions: unknown profession"):
        SAECorpusDataModule(professions=["astronaut"])
    with pytest.raises(ValueError, match="also training professions"):
        SAECorpusDataModule(professions=["nurse"], heldout=["nurse"])


def test_biased_captions_follow_the_stereotype_and_explicit_words() -> None:
    data = BiasedCaptionsDataModule(professions=["nurse", "pilot"], samples=4000, per_class=4)
    data.setup("fit")
    s = data.train_set
    for p, name in enumerate(["nurse", "pilot"]):
        neutral = torch.tensor([data.captions[c] == f"a photo of a {name}" or data.captions[c] == f"a {name} at work"
                                for c in s.captions.tolist()]) & (s.profession == p)
        assert abs(s.gender[neutral].float().mean().item() - MALE_SHARE[name]) < 0.08
    female = torch.tensor(["female" in data.captions[c] or "woman" in data.captions[c] for c in s.captions.tolist()])
    assert (s.gender[female] == 0).all() and female.sum() > 100
    assert (s.captions == 0).float().mean() == pytest.approx(0.1, abs=0.03)  # CFG dropout
    assert s.images.shape[1:] == (2, 16, 16) and s.images.min() >= -1 and s.images.max() <= 1
