"""An SAE training run interrupted after one epoch and resumed from its checkpoint equals an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.sae_debias import SAECorpusDataModule
from lit_modules.sae_debias import SAEDebiasModule
from tests.lit_modules.test_sae_debias import tiny_bert  # noqa: F401  (the fixture)


def run(folder: Path, encoder: Path, epochs: int, ckpt: Path | None = None) -> SAEDebiasModule:
    L.seed_everything(0)
    module = SAEDebiasModule(text_encoder=str(encoder), layer=1, k=4, dead_tokens=50)
    data = SAECorpusDataModule(tokenizer=str(encoder), batch_size=64, seed=3)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(folder),
                        callbacks=[ModelCheckpoint(dirpath=folder / "ckpt", save_last=True)])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    return module


@pytest.mark.slow
def test_resumed_sae_training_equals_the_uninterrupted_run(tiny_bert: Path, tmp_path: Path) -> None:  # noqa: F811
    whole = run(tmp_path / "whole", tiny_bert, 2)
    run(tmp_path / "part", tiny_bert, 1)
    resumed = run(tmp_path / "resumed", tiny_bert, 2, ckpt=tmp_path / "part" / "ckpt" / "last.ckpt")
    one_epoch = run(tmp_path / "one", tiny_bert, 1)
    for name, value in whole.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], value), name
    assert not torch.equal(one_epoch.sae.W_enc, whole.sae.W_enc)  # the second epoch did train
