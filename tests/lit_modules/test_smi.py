"""SMIModule: sparse inversion mechanics, outputs, best-iterate fix, resumption, DDP, bad input."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import timm
import torch

import lit_modules.smi as smi
from callbacks.token_dropping import SparseTokenDropping
from core import vit_tokens
from core.timm_models import export_weights

TEACHER = {"img_size": 16, "patch_size": 4, "num_classes": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TEACHER)
    return str(export_weights(vit, tmp_path_factory.mktemp("teacher") / "teacher.safetensors"))


def make(teacher_file: str, out: Path, **kwargs) -> smi.SMIModule:
    args = dict(teacher="vit_tiny_patch16_224", teacher_kwargs=TEACHER, teacher_checkpoint=teacher_file,
                batch_size=4, num_batches=1, iterations=12, mean=(0.5,) * 3, std=(0.5,) * 3, labels="balanced",
                output_dir=str(out))
    return smi.SMIModule(**{**args, **kwargs})


def fit(module: smi.SMIModule, prune=(2, 4, 6, 8), **kwargs) -> L.Trainer:
    callbacks = [SparseTokenDropping(list(prune), 0.7)] if prune else []
    ckpt_path = kwargs.pop("ckpt_path", None)
    trainer = L.Trainer(max_epochs=1, callbacks=callbacks + kwargs.pop("callbacks", []), logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        enable_checkpointing=kwargs.pop("enable_checkpointing", False), **kwargs)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def test_sparse_inversion_writes_the_mask_it_used(teacher_file: str, tmp_path: Path) -> None:
    module = make(teacher_file, tmp_path, return_images="last")
    fit(module)
    record = torch.load(tmp_path / "batch_0000.pt", weights_only=True)
    assert (tmp_path / "batch_0000.png").is_file()
    assert module.kept_index.shape == (4, 2)  # 16 -> 11 -> 7 -> 4 -> 2 patches
    assert torch.equal(record["keep_index"], module.kept_index)
    assert record["keep_mask"].sum(1).tolist() == [2, 2, 2, 2]
    pixels = vit_tokens.patch_mask_to_pixels(record["keep_index"], (4, 4), 4).expand_as(record["images"])
    assert record["images"][~pixels].abs().max() == 0
    live = (module.images.detach() * 0.5 + 0.5).clamp(0, 1)
    torch.testing.assert_close(record["images"][pixels], live[pixels])
    assert record["labels"].tolist() == [0, 1, 2, 3]


def test_augmentation_is_off_on_the_steps_around_each_drop(teacher_file, tmp_path, monkeypatch) -> None:
    augmented = []
    real = smi.random_roll_flip

    def spy(x, *args):
        augmented.append(module.global_step)
        return real(x, *args)

    monkeypatch.setattr(smi, "random_roll_flip", spy)
    module = make(teacher_file, tmp_path)
    fit(module, prune=(3, 6))
    assert sorted(set(range(12)) - set(augmented)) == [2, 3, 5, 6]


def test_best_iterate_is_a_copy_and_last_reproduces_the_release(teacher_file, tmp_path) -> None:
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    best = make(teacher_file, tmp_path / "best", return_images="best", lr=0.5)
    fit(best, callbacks=[Record()])
    last = make(teacher_file, tmp_path / "last", return_images="last", lr=0.5)
    fit(last)
    saved_best = torch.load(tmp_path / "best" / "batch_0000.pt", weights_only=True)
    saved_last = torch.load(tmp_path / "last" / "batch_0000.pt", weights_only=True)
    assert best.best_loss[0] == min(losses)
    assert losses.index(min(losses)) != len(losses) - 1  # otherwise this test shows nothing
    torch.testing.assert_close(saved_best["images"], (best.best_images * 0.5 + 0.5).clamp(0, 1) *
                               vit_tokens.patch_mask_to_pixels(best.best_kept_index, (4, 4), 4))
    assert not torch.equal(saved_best["images"], saved_last["images"])
    assert torch.equal(best.images, last.images)  # same trajectory: only the returned iterate differs


def test_reselect_ranks_the_final_images_densely(teacher_file, tmp_path) -> None:
    module = make(teacher_file, tmp_path, return_images="last", final_mask="reselect")
    fit(module)
    record = torch.load(tmp_path / "batch_0000.pt", weights_only=True)
    _, scores = vit_tokens.forward_kept(module.teacher, module.images.detach(), None, return_cls_attention=True)
    assert torch.equal(record["keep_index"], vit_tokens.top_patches(scores, 2))


def test_resume_mid_inversion_equals_an_uninterrupted_run(teacher_file, tmp_path) -> None:
    full = make(teacher_file, tmp_path / "full", num_batches=2, iterations=8)
    fit(full, prune=(2, 4))
    every = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    first = make(teacher_file, tmp_path / "first", num_batches=2, iterations=8)
    fit(first, prune=(2, 4), callbacks=[every], enable_checkpointing=True, max_steps=11)
    resumed = make(teacher_file, tmp_path / "resumed", num_batches=2, iterations=8)
    fit(resumed, prune=(2, 4), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=10.ckpt"))
    assert resumed.global_step == 16
    assert torch.equal(resumed.images, full.images)
    for name in ("batch_0000.pt", "batch_0001.pt"):
        a = torch.load(tmp_path / "full" / name, weights_only=True)
        b = torch.load(tmp_path / ("first" if name.endswith("0.pt") else "resumed") / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ddp_spawn_inverts_disjoint_rows_with_identical_state(teacher_file, tmp_path) -> None:
    module = make(teacher_file, tmp_path, return_images="last")
    fit(module, strategy="ddp_spawn", devices=2)
    record = torch.load(tmp_path / "batch_0000.pt", weights_only=True)
    assert record["images"].shape == (4, 3, 16, 16)
    assert record["keep_mask"].sum(1).tolist() == [2, 2, 2, 2]
    assert torch.equal(record["keep_index"], module.kept_index)  # rank 0's state holds every row
    # each rank optimised its own rows: the two halves did not receive the same updates
    assert not torch.allclose(record["images"][:2], record["images"][2:])


def test_cnn_teacher_runs_dense_with_the_bn_prior_and_refuses_the_sparse_path(tmp_path) -> None:
    kwargs = dict(teacher="resnet10t", teacher_kwargs={"num_classes": 4}, teacher_checkpoint=None,
                  mean=(0.5,) * 3, std=(0.5,) * 3, batch_size=2, iterations=3, output_dir=str(tmp_path))
    module = smi.SMIModule(**kwargs, bn_weight=0.01)
    module.images = torch.nn.Parameter(torch.zeros(2, 3, 32, 32))
    module.best_images = torch.zeros(2, 3, 32, 32)
    fit(module, prune=None)
    assert torch.load(tmp_path / "batch_0000.pt", weights_only=True)["images"].shape == (2, 3, 32, 32)
    with pytest.raises(TypeError, match="model.init_args.teacher: sparse token computation needs a timm VisionTransformer"):
        fit(smi.SMIModule(**kwargs), prune=(1,))


def test_bad_input_names_the_config_key(teacher_file, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model.init_args.teacher_checkpoint: no file at"):
        make(str(tmp_path / "missing.safetensors"), tmp_path)
    with pytest.raises(ValueError, match="mean/std need 3 values"):
        make(teacher_file, tmp_path, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="unknown timm model"):
        make(teacher_file, tmp_path, teacher="vit_nonexistent")
    with pytest.raises(ValueError, match="bn_weight > 0 needs a CNN teacher"):
        make(teacher_file, tmp_path, bn_weight=1.0)


def test_inverted_images_are_logged_to_wandb(teacher_file, tmp_path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="litzoo-test", save_dir=str(tmp_path), offline=True)
    module = make(teacher_file, tmp_path / "out", iterations=3)
    trainer = L.Trainer(max_epochs=1, logger=logger, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accelerator="cpu")
    trainer.fit(module)
    logged = dict(logger.experiment.summary)["inverted"]
    logger.experiment.finish()
    assert logged["_type"] == "images/separated" and logged["count"] == 1
