"""LLM-SC evaluation module and DeepSC through the CLI (tiny random Llama), quirks and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train import cli_main

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "llm_sc"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from datamodules.sources import gpt2_tokenizer

    folder = tmp_path_factory.mktemp("tiny_llama_sc")
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def llm_args(config: str, tiny: str, run_overrides: list[str], *extra: str) -> list[str]:
    return ["test", "--config", str(CONFIGS / config), *run_overrides, "--trainer.fast_dev_run=true",
            "--trainer.accelerator=cpu", "--trainer.devices=1", f"--model.init_args.model={tiny}",
            "--model.init_args.dtype=float32", f"--data.init_args.tokenizer={tiny}", "--data.init_args.source=pydoc",
            "--data.init_args.max_tokens=40", "--data.init_args.batch_size=2", "--model.init_args.beam_width=3",
            "--model.init_args.snr_db=[4, 30]", "--model.init_args.channel=awgn", *extra]  # Rayleigh fades at 30 dB too


@pytest.mark.slow
def test_demo_config_fast_dev_run_logs_every_metric_and_draws_curves(tiny_llama: str, run_overrides: list[str],
                                                                     tmp_path: Path) -> None:
    cli = cli_main(llm_args("demo.yaml", tiny_llama, run_overrides))
    logged = cli.trainer.callback_metrics
    for metric in ("ber", "ter", "bleu1", "bleu4", "similarity"):
        for system in ("llm_sc", "greedy", "uncoded"):
            assert f"test/{metric}_{system}_snr30" in logged, (metric, system)
    assert float(logged["test/ber_llm_sc_snr30"]) == 0.0 and float(logged["test/bleu1_llm_sc_snr30"]) == 1.0
    assert float(logged["test/ber_uncoded_snr4"]) > 0.01  # 4 dB: errors, so the 30 dB check has teeth
    assert float(logged["test/similarity_uncoded_snr30"]) > 0.99
    assert list(tmp_path.rglob("llm_sc_curves.png"))


def test_paper_config_fast_dev_run_with_release_quirks(tiny_llama: str, run_overrides: list[str]) -> None:
    cli = cli_main(llm_args("vicuna7b_europarl.yaml", tiny_llama, run_overrides, "--model.init_args.known_prefix=5",
                            "--model.init_args.vocab_mask_leak=true", "--model.init_args.n0_scaled=true",
                            "--model.init_args.similarity_model=null"))
    assert float(cli.trainer.callback_metrics["test/ber_llm_sc_snr30"]) == 0.0


def deepsc_args(config: str, run_overrides: list[str], *extra: str) -> list[str]:
    return ["fit", "--config", str(CONFIGS / config), *run_overrides, "--trainer.fast_dev_run=true",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--data.init_args.source=pydoc", *extra]


@pytest.mark.parametrize("config", ["demo_deepsc.yaml", "deepsc_europarl.yaml"])
def test_deepsc_configs_fast_dev_run(config: str, run_overrides: list[str]) -> None:
    cli = cli_main(deepsc_args(config, run_overrides, "--trainer.precision=32-true", "--data.init_args.batch_size=4",
                               "--data.init_args.max_words=12", "--model.init_args.eval_snr_db=[10]"))
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


@pytest.mark.slow
def test_deepsc_trains_and_its_bleu_rises_with_snr(tmp_path: Path) -> None:
    import lightning as L

    from datamodules.llm_sc import DeepSCDataModule
    from lit_modules.llm_sc_deepsc import DeepSCModule

    torch.manual_seed(0)
    dm = DeepSCDataModule(max_words=8, batch_size=16)
    dm.setup("fit")
    dm.data["train"] = dm.data["train"][:64]
    dm.data["test"] = dm.data["train"]  # reconstruction of seen sentences: the channel decides
    module = DeepSCModule(d_model=32, num_heads=2, dff=64, num_layers=1, dropout=0.0, channel="awgn",
                          train_snr_db=(0.0, 20.0), eval_snr_db=[-10.0, 20.0], lr=3e-3, weight_decay=0.0)
    trainer = L.Trainer(max_epochs=120, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    low, high = (trainer.test(module, dm, verbose=False)[0][f"test/bleu1_snr{s}"] for s in ("-10", "20"))
    assert high > low + 0.2 and high > 0.5, (low, high)
    assert list(tmp_path.rglob("deepsc_test_curves.png"))


def test_bad_input_names_the_key(tiny_llama: str, tmp_path: Path, run_overrides: list[str]) -> None:
    from lit_modules.llm_sc import LLMSCModule, load_causal_lm

    with pytest.raises(ValueError, match="model.init_args.snr_db is empty"):
        LLMSCModule(snr_db=[])
    with pytest.raises(ValueError, match="model.init_args.systems: unknown"):
        LLMSCModule(systems=["turbo"])
    from transformers import LlamaConfig, LlamaForCausalLM

    from datamodules.sources import gpt2_tokenizer

    gpt2_tokenizer().save_pretrained(tmp_path / "small")
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match=r"model.init_args.model: the LM's vocabulary \(300\) differs"):
        load_causal_lm(str(tmp_path / "small"), "float32", False, "model.init_args.model")
    other = gpt2_tokenizer()
    other.add_tokens(["<extra>"])
    other.save_pretrained(tmp_path / "other_tok")
    with pytest.raises(ValueError, match="data.init_args.tokenizer has 50258 tokens"):
        cli_main(llm_args("demo.yaml", tiny_llama, run_overrides, f"--data.init_args.tokenizer={tmp_path / 'other_tok'}",
                          "--model.init_args.similarity_model=null"))


def test_vocabulary_mask_keeps_decoding_inside_the_allowed_ids() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.fading_channel import transmit
    from core.map_beam_decoder import map_beam_decode
    from core.sequence_priors import CausalLMPrior
    from core.token_modem import TokenModem

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)).eval()
    modem, allowed = TokenModem(64, "qpsk"), torch.arange(0, 64, 4)
    ids = allowed[torch.randint(0, 16, (6, 8), generator=torch.Generator().manual_seed(1))]
    y, h, n0 = transmit(modem.modulate(ids), -3.0, modem.es, "awgn", torch.Generator().manual_seed(2))
    args = (modem, y, None, n0, torch.full((6,), 8), torch.zeros(6, 1, dtype=torch.long))
    free = map_beam_decode(CausalLMPrior(lm), *args, beam_width=3)[0]
    masked = map_beam_decode(CausalLMPrior(lm, mask_ids=torch.arange(1, 64, 4).repeat(3) + torch.arange(3).repeat_interleave(16)), *args, beam_width=3)[0]
    assert (free % 4 != 0).any()  # at -3 dB the unmasked decoder leaves the allowed ids
    assert (masked % 4 == 0).all()


def test_missing_paper_data_and_tokenizer_name_their_keys(tmp_path: Path) -> None:
    from datamodules.llm_sc import LLMSCDataModule, split_sentences

    with pytest.raises(FileNotFoundError, match="data.init_args.source"):
        split_sentences(str(tmp_path / "europarl"))
    with pytest.raises(FileNotFoundError, match="data.init_args.tokenizer: cannot load"):
        LLMSCDataModule(tokenizer=str(tmp_path / "no_model")).setup("test")


def test_document_split_is_disjoint_and_sentences_are_prose() -> None:
    from datamodules.llm_sc import split_sentences

    splits = split_sentences("pydoc")
    assert min(len(v) for v in splits.values()) > 100
    assert not set(splits["test"]) & (set(splits["train"]) | set(splits["val"]))
    assert all(s[0].isupper() and s.endswith(".") and "::" not in s for v in splits.values() for s in v)
