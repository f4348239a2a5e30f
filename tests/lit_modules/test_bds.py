"""BDSModule with a tiny random Llama: SFT equals a plain fine-tune, resume, CLI, predict, bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import train
from callbacks.bayesian_weighting import BayesianDataScheduler
from datamodules.bds import BDSDataModule
from lit_modules.bds import BDSModule

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(prompt_format="alpaca", num_finetune=16, num_alignment=8, num_eval_harmful=4, num_eval_task=4,
             batch_size=4, eval_batch_size=4, max_length=64, shuffle=False)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from datamodules.sources import gpt2_tokenizer

    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def make(tiny_llama: str, **kwargs) -> tuple[BDSModule, BDSDataModule]:
    module_args = dict(model=tiny_llama, lora_r=4, lora_alpha=8.0, lr=1e-2, max_new_tokens=4)
    module = BDSModule(**{**module_args, **kwargs})
    torch.manual_seed(0)
    module.configure_model()
    return module, BDSDataModule(tokenizer=tiny_llama, **SMALL)


def fit(module: BDSModule, dm: BDSDataModule, callbacks=(), epochs: int = 1, **kwargs) -> L.Trainer:
    ckpt_path = kwargs.pop("ckpt_path", None)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=list(callbacks), enable_checkpointing=kwargs.pop("enable_checkpointing", False),
                        **kwargs)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def lora_state(module: BDSModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


def test_sft_mode_equals_a_plain_finetune(tiny_llama: str) -> None:
    module, dm = make(tiny_llama, mode="sft")
    reference = copy.deepcopy(module.model)
    fit(module, dm)
    params = [p for p in reference.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for combined, _, _ in dm.train_dataloader():  # unshuffled: the same batches as the fit
        batch = combined["ft"]
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_row = []
        for b in range(len(logits)):  # naive: each row's response tokens, one cross-entropy per row
            keep = batch["labels"][b, 1:] != -100
            per_row.append(F.cross_entropy(logits[b, :-1][keep], batch["labels"][b, 1:][keep]))
        opt.zero_grad()
        torch.stack(per_row).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    expected = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}
    got = lora_state(module)
    assert got.keys() == expected.keys() and len(got) == 2 * 3 * 2  # A and B of q/k/v in 2 blocks
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(got[n], p) for n, p in lora_state(make(tiny_llama)[0]).items())


def test_weights_from_a_callback_scale_the_fine_tuning_loss(tiny_llama: str) -> None:
    class ZeroWeights(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            module.set_sample_weights(torch.zeros(len(batch["ft"]["index"])))

    module, dm = make(tiny_llama, mode="weighted_only", weight_decay=0.0)
    before = lora_state(module)
    fit(module, dm, [ZeroWeights()])
    assert all(torch.equal(before[n], p) for n, p in lora_state(module).items())  # weight 0: no update at all
    unweighted, dm = make(tiny_llama, mode="weighted_only", weight_decay=0.0)
    fit(unweighted, dm)
    assert any(not torch.equal(before[n], p) for n, p in lora_state(unweighted).items())


def test_resume_restores_scheduler_weights_and_lora(tiny_llama: str, tmp_path: Path) -> None:
    def callback() -> BayesianDataScheduler:
        return BayesianDataScheduler(lr=0.05)

    full_module, dm = make(tiny_llama)
    full = callback()
    fit(full_module, dm, [full], epochs=2)
    every = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    first, dm = make(tiny_llama)
    fit(first, dm, [callback(), every], epochs=1, enable_checkpointing=True)
    ckpt = tmp_path / "epoch=0-step=4.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert len(saved["state_dict"]) == 12  # LoRA weights only, not the frozen base model
    resumed_module, dm = make(tiny_llama)
    resumed = callback()
    fit(resumed_module, dm, [resumed], epochs=2, ckpt_path=str(ckpt))
    assert not torch.allclose(full.all_weights(), torch.ones(16))
    torch.testing.assert_close(resumed.all_weights(), full.all_weights(), rtol=0, atol=1e-5)
    for name, value in lora_state(full_module).items():
        torch.testing.assert_close(lora_state(resumed_module)[name], value, rtol=1e-4, atol=1e-6)
    # the weight history (drawn at the end) survives the resume: epoch 0 (init), 1, 2 as in the full run
    assert [h["epoch"] for h in resumed.history] == [h["epoch"] for h in full.history] == [0, 1, 2]
    assert resumed.history[-1]["weight_mean_harmful"] == pytest.approx(full.history[-1]["weight_mean_harmful"], abs=1e-5)
    assert (Path.cwd() / "bds_weights.png").stat().st_size > 1000


def test_fit_exports_a_peft_adapter_with_a_model_card(tiny_llama: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module, dm = make(tiny_llama)
    fit(module, dm)
    folder = Path.cwd() / "adapter"
    card = (folder / "README.md").read_text()
    assert "base_model:" in card and "## Metrics" in card and "harmful_ratio" in card
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(folder))
    for name, value in lora_state(module).items():
        torch.testing.assert_close(dict(loaded.named_parameters())[name], value)


def test_cli_fast_dev_run_with_a_tiny_llama(tiny_llama: str, run_overrides: list[str]) -> None:
    cli = train.cli_main([
        "fit", "--config", str(REPO / "configs" / "bds" / "demo.yaml"), "--trainer.fast_dev_run=1", *run_overrides,
        f"--model.init_args.model={tiny_llama}", "--model.init_args.lora_layers=1", "--model.init_args.max_new_tokens=4",
        f"--data.init_args.tokenizer={tiny_llama}", "--data.init_args.prompt_format=alpaca",
        "--data.init_args.num_finetune=8", "--data.init_args.num_alignment=4", "--data.init_args.num_eval_harmful=2",
        "--data.init_args.num_eval_task=2", "--data.init_args.batch_size=2",
    ])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    scheduler = next(c for c in cli.trainer.callbacks if isinstance(c, BayesianDataScheduler))
    assert scheduler.net.logits.shape == (8,) and not torch.allclose(scheduler.net.logits, torch.tensor(0.1))
    assert {"val/harmful_score", "val/task_acc"} <= set(cli.trainer.callback_metrics)
    assert sum(p.requires_grad for p in cli.model.model.parameters()) == 3 * 2  # q/k/v A+B, top block only


def test_predict_writes_one_answer_per_prompt(tiny_llama: str, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2 plus 3?\n\nName a colour.\n")
    module, _ = make(tiny_llama, predictions_file=str(tmp_path / "answers.jsonl"))
    dm = BDSDataModule(tokenizer=tiny_llama, **{**SMALL, "predict_file": str(prompts)})
    out = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).predict(module, datamodule=dm)
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["What is 2 plus 3?", "Name a colour."] == [r["prompt"] for r in out[0]]


def test_bad_input_gives_clear_errors(tiny_llama: str, tmp_path: Path) -> None:
    module, dm = make(tiny_llama)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))[0]
    no_index = {"ft": {k: v for k, v in batch["ft"].items() if k != "index"}, "align": batch["align"]}
    with pytest.raises(ValueError, match="no dataset 'index'"):
        module.training_step(no_index, 0)
    with pytest.raises(ValueError, match="no dataset 'index'"):
        module.sample_weighting_batch(no_index)
    with pytest.raises(ValueError, match="needs an alignment batch.*num_alignment"):
        module.training_step({"ft": batch["ft"]}, 0)
    with pytest.raises(ValueError, match="num_alignment must be >= 1: the alignment set would be empty"):
        BDSDataModule(tokenizer=tiny_llama, num_alignment=0)
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"harmful_ratio must lie in \[0, 1\]"):
            BDSDataModule(tokenizer=tiny_llama, harmful_ratio=p)
    with pytest.raises(ValueError, match=r"lora_target_modules: \['c_attn'\] not found"):
        make(tiny_llama, lora_target_modules=["c_attn"])
    with pytest.raises(FileNotFoundError, match="model.init_args.model: cannot load"):
        make(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="prompt_format to alpaca or plain"):
        BDSDataModule(tokenizer=tiny_llama, **{**SMALL, "prompt_format": "chat"}).setup("fit")


def write_release_files(root: Path) -> None:
    """Tiny stand-ins of the release's JSON files (BeaverTails keys prompt/response; SST2 instruction/input/output)."""
    root.mkdir()
    safe = [{"prompt": f"harmful question {i}?", "response": "I cannot help with that."} for i in range(5010)]
    harmful = [{"prompt": f"bad request {i}", "response": "Sure, step 1."} for i in range(20)]
    sst2 = [{"instruction": "Analyze the sentiment", "input": f"a {w} film", "output": w}
            for w in ("positive", "negative") * 10]
    for name, rows in {"beavertails_safe_train": safe, "beavertails_harmful_train": harmful,
                       "beavertails_test": harmful, "sst2": sst2, "sst2_test": sst2}.items():
        (root / f"{name}.json").write_text(json.dumps(rows))


def test_paper_config_runs_on_local_release_files(tiny_llama: str, tmp_path: Path, run_overrides: list[str]) -> None:
    write_release_files(tmp_path / "data")
    cli = train.cli_main([
        "fit", "--config", str(REPO / "configs" / "bds" / "llama2_sst2.yaml"), "--trainer.fast_dev_run=1",
        "--trainer.accelerator=cpu", *run_overrides, f"--model.init_args.model={tiny_llama}",
        "--model.init_args.dtype=float32", "--model.init_args.max_new_tokens=4", "--model.init_args.task_max_new_tokens=2",
        "--model.init_args.judge=core.refusal_judge.KeywordRefusalJudge", "--model.init_args.judge_kwargs={}",
        f"--data.init_args.tokenizer={tiny_llama}", f"--data.init_args.data_root={tmp_path / 'data'}",
        "--data.init_args.num_finetune=10", "--data.init_args.num_alignment=4", "--data.init_args.num_eval_harmful=2",
        "--data.init_args.num_eval_task=2", "--data.init_args.batch_size=2", "--data.init_args.max_length=64",
    ])
    assert cli.trainer.state.finished
    dm = cli.datamodule
    assert [r["instruction"] for r in dm.raw["align"]] == [f"harmful question {i}?" for i in range(5000, 5004)]
    assert sum(r["source"] for r in dm.raw["ft"]) == 1  # round(0.1 * 10) harmful rows
    assert dm.tokenizer.decode(dm.splits["ft"][0]["input_ids"]).startswith("Below is an instruction")


def test_paper_data_missing_names_data_root(tiny_llama: str) -> None:
    dm = BDSDataModule(tokenizer=tiny_llama, task="sst2", harmful_source="beavertails", prompt_format="alpaca")
    with pytest.raises(FileNotFoundError, match="data.init_args.data_root"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="harmful_source: beavertails"):
        BDSDataModule(tokenizer=tiny_llama, task="sst2", prompt_format="alpaca").setup("fit")


@pytest.mark.parametrize("mode", ["mix", "seal"])
def test_mix_and_seal_losses_follow_their_formulas(tiny_llama: str, mode: str) -> None:
    class Check(L.Callback):
        """Sets weights 0..2 on each batch, computes the mode's loss by hand, compares with the step's."""

        def __init__(self) -> None:
            self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            weights = torch.linspace(0.0, 2.0, len(batch["ft"]["index"]))
            module.set_sample_weights(weights)
            with torch.no_grad():
                ft = module.sequence_losses(module._ft(batch))
                align = module.sequence_losses(batch["align"]).mean()
            rho = module.rho
            self.expected = align + ft.mean() if mode == "mix" else rho * align + (1 - rho) * (weights * ft).mean()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.pairs.append((outputs["loss"] if isinstance(outputs, dict) else outputs, self.expected))

    module, dm = make(tiny_llama, mode=mode, rho=0.3, rho_decay=0.1, lr=0.0, weight_decay=0.0)
    check = Check()
    fit(module, dm, [check], epochs=2)
    for loss, expected in check.pairs:
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    if mode == "seal":
        assert module.rho == pytest.approx(0.1)  # 0.3 - 2 epochs x 0.1


def test_a_checkpoint_with_other_lora_settings_is_refused(tiny_llama: str, tmp_path: Path) -> None:
    every = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    first, dm = make(tiny_llama)
    fit(first, dm, [every], epochs=1, enable_checkpointing=True)
    other, dm = make(tiny_llama, lora_r=2)
    with pytest.raises(ValueError, match=r"LoRA weights do not fit model.init_args.*0 missing, 0 unexpected, 12 of another"):
        fit(other, dm, epochs=2, ckpt_path=str(tmp_path / "epoch=0-step=4.ckpt"))


def test_scalar_init_follows_the_release_per_transform() -> None:
    assert BayesianDataScheduler(transform="softmax").init == 0.1
    assert BayesianDataScheduler(transform="sigmoid").init == BayesianDataScheduler(transform="identity").init == -1e-4
    assert BayesianDataScheduler(transform="sigmoid", init=0.5).init == 0.5


def test_reference_adapter_trains_on_weighted_ft_only_and_leaves_the_default_update_alone(tiny_llama: str) -> None:
    plain, dm = make(tiny_llama, mode="bds")
    fit(plain, dm, [BayesianDataScheduler(lr=0.05)], max_steps=1)
    module, dm = make(tiny_llama, mode="bds", reference_adapter=True)
    ref_before = {n: p.detach().clone() for n, p in module.model.named_parameters() if ".reference." in n}
    seen: list[torch.Tensor] = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seen.append(pl_module.reference_sample_losses())

    fit(module, dm, [BayesianDataScheduler(lr=0.05, reference_weight=1.0), Spy()], max_steps=1)
    # theta' never touches theta: the default adapter takes exactly the step it takes without a reference
    default = {n: p.detach() for n, p in module.model.named_parameters() if ".default." in n}
    for name, value in lora_state(plain).items():
        torch.testing.assert_close(default[name], value, rtol=0, atol=0)
    ref_after = {n: p for n, p in module.model.named_parameters() if ".reference." in n}
    assert len(ref_after) == 12 and any(not torch.equal(ref_before[n], p) for n, p in ref_after.items())
    # the reference losses are those of theta' before its update (B = 0: the starting model)
    first = next(iter(dm.train_dataloader()))[0]["ft"]
    with torch.no_grad(), module.model.disable_adapter():
        base_losses = module.sequence_losses(first)
    torch.testing.assert_close(seen[0], base_losses.float(), rtol=1e-4, atol=1e-5)
    assert module.model.active_adapter == "default"


def test_init_adapter_starts_from_the_merged_adapter(tiny_llama: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained, dm = make(tiny_llama, mode="sft")
    fit(trained, dm, default_root_dir=str(tmp_path))
    started = BDSModule(model=tiny_llama, lora_r=2, init_adapter=str(tmp_path / "adapter"))
    started.configure_model()
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(tmp_path / "adapter"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(started.model(input_ids=ids).logits, expected(input_ids=ids).logits, atol=1e-5,
                                   rtol=1e-4)
    with pytest.raises(FileNotFoundError, match="model.init_args.init_adapter"):
        BDSModule(model=tiny_llama, init_adapter=str(tmp_path / "missing")).configure_model()
