"""FSDP: one unit per transformer block by class name, and full weights loaded on rank 0 only."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cli.fsdp import DEFAULT_BLOCKS, BlockFSDPStrategy, block_wrap_policy
from core.fsdp_init import loads_full_weights


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


def test_the_policy_wraps_exactly_the_named_blocks() -> None:
    model = tiny_llama()
    policy = block_wrap_policy(["LlamaDecoderLayer"])
    wrapped = [name for name, m in model.named_modules() if policy(module=m, recurse=False, nonwrapped_numel=0)]
    assert wrapped == [f"model.layers.{i}" for i in range(3)]
    assert all(policy(module=m, recurse=True, nonwrapped_numel=0) for m in model.modules())  # descend everywhere


def test_timm_vit_blocks_are_in_the_defaults() -> None:
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    policy = block_wrap_policy(DEFAULT_BLOCKS)
    assert [n for n, m in vit.named_modules() if policy(module=m, recurse=False, nonwrapped_numel=0)] == ["blocks.0", "blocks.1"]


def test_only_rank_zero_loads_full_weights_when_states_are_broadcast() -> None:
    strategy = BlockFSDPStrategy(blocks=["LlamaDecoderLayer"])
    assert strategy.kwargs["sync_module_states"] is True
    assert loads_full_weights(SimpleNamespace(strategy=strategy, global_rank=0))
    assert not loads_full_weights(SimpleNamespace(strategy=strategy, global_rank=1))
    no_sync = BlockFSDPStrategy(blocks=["LlamaDecoderLayer"], sync_module_states=False)
    assert loads_full_weights(SimpleNamespace(strategy=no_sync, global_rank=1))
    assert loads_full_weights(SimpleNamespace(strategy=SimpleNamespace(), global_rank=3))  # DDP, single device


def test_bds_builds_ranks_above_zero_on_the_meta_device(tmp_path, monkeypatch) -> None:
    from datamodules.sources import gpt2_tokenizer
    from lit_modules.bds import BDSModule

    tokenizer = gpt2_tokenizer()
    model = tiny_llama()
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    module = BDSModule(model=str(tmp_path), lora_r=2, lora_alpha=4.0)
    trainer = SimpleNamespace(strategy=BlockFSDPStrategy(blocks=["LlamaDecoderLayer"]), global_rank=1)
    monkeypatch.setattr(BDSModule, "trainer", property(lambda self: trainer))
    module._trainer = trainer
    module.configure_model()
    frozen = [p for p in module.model.parameters() if not p.requires_grad]
    assert frozen and all(p.device.type == "meta" for p in frozen)


SCRIPT = """
import sys, torch, lightning as L
from transformers import LlamaConfig, LlamaForCausalLM
from cli.fsdp import BlockFSDPStrategy

class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    def training_step(self, batch, batch_idx):
        loss = self.net(input_ids=batch[0], labels=batch[0]).loss
        self.log("loss", loss, sync_dist=True)
        return loss
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

strategy = BlockFSDPStrategy(blocks=["LlamaDecoderLayer"]) if sys.argv[1] == "fsdp" else "ddp"
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(0))), batch_size=4)
trainer = L.Trainer(accelerator="gpu", devices=2, strategy=strategy, max_steps=3, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, precision="32-true")
module = Tiny()
trainer.fit(module, data)
if trainer.is_global_zero:
    shards = sum(p.numel() for p in module.parameters())
    print(f"RESULT {float(trainer.callback_metrics['loss'])} {shards}")
"""


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_fsdp_shards_and_matches_ddp_on_two_gpus(tmp_path, subprocess_env) -> None:
    import subprocess
    import sys

    script = tmp_path / "fsdp_vs_ddp.py"
    script.write_text(SCRIPT)
    out = {}
    for name in ("ddp", "fsdp"):
        run = subprocess.run([sys.executable, str(script), name], capture_output=True, text=True, cwd=tmp_path,
                             env=subprocess_env, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        loss, numel = run.stdout.split("RESULT ")[1].split()
        out[name] = (float(loss), int(numel))
    assert out["fsdp"][0] == pytest.approx(out["ddp"][0], rel=1e-4)
    assert out["fsdp"][1] < out["ddp"][1]  # each rank holds a shard, not the whole model
