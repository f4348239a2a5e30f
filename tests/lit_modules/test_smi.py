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


def test_best_iterate_is_the_image_that_gave_the_best_loss(teacher_file, tmp_path) -> None:
    losses: list[float] = []
    before: list[torch.Tensor] = []  # the images each step's loss is computed on
    kept: list[torch.Tensor] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            before.append(module.images.detach().clone())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))
            kept.append(module.kept_index.clone())  # drops happen before the step, so this is its set

    best = make(teacher_file, tmp_path / "best", return_images="best", lr=0.5)
    fit(best, callbacks=[Record()])
    last = make(teacher_file, tmp_path / "last", return_images="last", lr=0.5)
    fit(last)
    saved_best = torch.load(tmp_path / "best" / "batch_0000.pt", weights_only=True)
    saved_last = torch.load(tmp_path / "last" / "batch_0000.pt", weights_only=True)
    step = losses.index(min(losses))
    assert step != len(losses) - 1  # otherwise this test shows nothing
    assert float(best.best_loss) == pytest.approx(min(losses))
    expected = (before[step] * 0.5 + 0.5).clamp(0, 1) * vit_tokens.patch_mask_to_pixels(kept[step], (4, 4), 4)
    torch.testing.assert_close(saved_best["images"], expected)
    assert torch.equal(saved_best["keep_index"], kept[step])
    assert not torch.equal(saved_best["images"], saved_last["images"])
    assert torch.equal(best.images, last.images)  # same trajectory: only the returned iterate differs


def test_reselect_ranks_the_final_images_densely(teacher_file, tmp_path) -> None:
    module = make(teacher_file, tmp_path, return_images="last", final_mask="reselect")
    fit(module)
    record = torch.load(tmp_path / "batch_0000.pt", weights_only=True)
    _, scores = vit_tokens.forward_kept(module.teacher, module.images.detach(), None, return_cls_attention=True)
    assert torch.equal(record["keep_index"], vit_tokens.top_patches(scores, 2))


def test_release_final_mask_ranks_de_normalised_images_and_counts_the_cls_token(teacher_file, tmp_path) -> None:
    module = make(teacher_file, tmp_path, return_images="last", final_mask="release")
    fit(module)  # tracked: 16 -> 11 -> 7 -> 4 -> 2 patches; release: int(17 * 0.7^4) = 4
    record = torch.load(tmp_path / "batch_0000.pt", weights_only=True)
    pixels = module.images.detach() * 0.5 + 0.5
    _, scores = vit_tokens.forward_kept(module.teacher, pixels, None, return_cls_attention=True)
    assert torch.equal(record["keep_index"], vit_tokens.top_patches(scores, 4))


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


class SaveRankState(L.Callback):
    """Each DDP rank writes its best-iterate buffers, to compare them across ranks."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, module) -> None:
        state = {k: getattr(module, k).detach().clone() for k in ("best_images", "best_loss", "best_keep_mask", "images")}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_hold_identical_best_state_and_match_one_process(teacher_file, tmp_path) -> None:
    # Without jitter one process and two DDP processes compute the same gradients, so the images must agree:
    # the CE:TV weighting does not depend on the world size.
    single = make(teacher_file, tmp_path / "one", jitter=0, tv_l2_weight=0.05)
    fit(single)
    module = make(teacher_file, tmp_path / "two", jitter=0, tv_l2_weight=0.05)
    fit(module, strategy="ddp_spawn", devices=2, callbacks=[SaveRankState(tmp_path)])
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # every rank holds the whole batch's best state
    # Float sums differ in order across processes and Adam amplifies that to ~1e-4 over 12 steps. The earlier
    # weighting (TV on each rank's half, loss scaled by the world size) changed the CE:TV ratio by sqrt(2).
    torch.testing.assert_close(rank0["images"], single.images.detach(), rtol=0, atol=2e-3)
    one = torch.load(tmp_path / "one" / "batch_0000.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "batch_0000.pt", weights_only=True)
    assert torch.equal(one["keep_index"], two["keep_index"]) and two["keep_mask"].sum(1).tolist() == [2, 2, 2, 2]
    torch.testing.assert_close(one["images"], two["images"], rtol=0, atol=2e-3)


def test_a_drop_at_step_1_scores_the_first_step(teacher_file, tmp_path) -> None:
    module = make(teacher_file, tmp_path, return_images="last")
    trainer = fit(module, prune=(1, 3))
    assert module.kept_index.shape == (4, 7)  # 16 -> 11 -> 7
    assert [h["step"] for h in trainer.callbacks[0].history] == [1, 3]


def test_schedules_the_module_cannot_run_are_refused_before_training(teacher_file, tmp_path) -> None:
    module = make(teacher_file, tmp_path / "late")
    with pytest.raises(ValueError, match=r"prune_iterations \[12\] lie at or beyond the 12 steps"):
        fit(module, prune=(2, 12))
    assert module.global_step == 0


class RecordSteps(L.Callback):
    """Appends each step's starting images, then its (logged loss, CE) pair, to ``seen``."""

    def __init__(self, seen: list) -> None:
        self.seen = seen

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append(module.images.detach().clone())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen.append((float(outputs["loss"]), float(trainer.callback_metrics["train/loss_ce"])))


def test_bn_prior_enters_the_loss(tmp_path) -> None:
    from core.bn_stats import BatchNormStatsPrior

    seen: list = []
    kwargs = dict(teacher="resnet10t", teacher_kwargs={"num_classes": 4}, teacher_checkpoint=None, mean=(0.5,) * 3,
                  std=(0.5,) * 3, batch_size=2, iterations=3, jitter=0, flip=False, tv_l2_weight=0.0,
                  output_dir=str(tmp_path))
    module = smi.SMIModule(**kwargs, bn_weight=0.5)
    module.images = torch.nn.Parameter(torch.zeros(2, 3, 32, 32))
    module.best_images = torch.zeros(2, 3, 32, 32)
    fit(module, prune=None, callbacks=[RecordSteps(seen)])
    x, (loss, ce) = seen[2], seen[3]  # the second step
    with torch.no_grad(), BatchNormStatsPrior(module.teacher, 10.0) as prior:
        module.teacher(x)
    bn = float(prior.loss())
    assert bn > 0.1 and loss == pytest.approx(ce + 0.5 * bn, rel=1e-4)


def test_patch_similarity_prior_enters_the_loss(teacher_file, tmp_path) -> None:
    from core.patch_similarity import PatchSimilarityPrior

    seen: list = []
    module = make(teacher_file, tmp_path, iterations=3, jitter=0, flip=False, tv_l2_weight=0.0,
                  patch_entropy_weight=0.5)
    fit(module, prune=None, callbacks=[RecordSteps(seen)])
    x, (loss, ce) = seen[2], seen[3]  # the second step
    with torch.no_grad(), PatchSimilarityPrior(module.teacher) as prior:
        module.teacher(x)
    pse = float(prior.loss())
    assert abs(pse) > 0.01 and loss == pytest.approx(ce + 0.5 * pse, rel=1e-5)
    assert json_settings(tmp_path)["patch_entropy_weight"] == 0.5


def json_settings(pool: Path) -> dict:
    import json

    return json.loads((pool / "manifest.json").read_text())["settings"]


def test_a_rerun_never_overwrites_or_mixes_a_pool(teacher_file, tmp_path) -> None:
    import json

    fit(make(teacher_file, tmp_path, num_batches=2, iterations=4), prune=(2,))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [b["file"] for b in manifest["batches"]] == ["batch_0000.pt", "batch_0001.pt"] and manifest["images"] == 8
    assert manifest["settings"]["prune_iterations"] == [2] and (tmp_path / "README.md").is_file()
    with pytest.raises(FileExistsError, match="model.init_args.output_dir: .* already holds an inverted pool"):
        fit(make(teacher_file, tmp_path, iterations=4), prune=(2,))
    fit(make(teacher_file, tmp_path, iterations=4, overwrite=True), prune=(2,))
    assert not (tmp_path / "batch_0001.pt").exists()  # the smaller rerun replaced the pool, nothing mixed
    from core.inverted_images import load_inverted_pool

    torch.save({}, tmp_path / "batch_0007.pt")  # a stray file the manifest does not list is never read
    assert load_inverted_pool(tmp_path)["images"].shape[0] == 4


def test_bad_input_names_the_config_key(teacher_file, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model.init_args.teacher_checkpoint: no file at"):
        make(str(tmp_path / "missing.safetensors"), tmp_path)
    with pytest.raises(ValueError, match="mean/std need 3 values"):
        make(teacher_file, tmp_path, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="unknown timm model"):
        make(teacher_file, tmp_path, teacher="vit_nonexistent")
    with pytest.raises(ValueError, match="bn_weight > 0 needs a CNN teacher"):
        make(teacher_file, tmp_path, bn_weight=1.0)
    with pytest.raises(ValueError, match="patch_entropy_weight = 1.0 needs a ViT teacher"):
        smi.SMIModule(teacher="resnet10t", teacher_kwargs={"num_classes": 4}, mean=(0.5,) * 3, std=(0.5,) * 3,
                      output_dir=str(tmp_path), patch_entropy_weight=1.0)


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
