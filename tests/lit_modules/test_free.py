"""FREEModule and the zoo stage: warm-up, pool writes, release flags, resumption, bad input, CLI configs."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from callbacks.gradient_alignment import GradientAlignment
from core.model_zoo import ZooTeacher, load_zoo, save_zoo
from core.stacked_conv4 import StackedConv4
from datamodules.free import FewShotEpisodes
from lit_modules.free import FREEModule
from train import cli_main

REPO = Path(__file__).resolve().parents[2]
TINY = dict(hidden=4, nz=8, ngf=4, teachers_per_step=2, images_per_class=4, generator_steps=2, warmup=1,
            augment_flip=False, replay_k_shot=1, replay_q_query=2, episode_batch=2, replay_batches=2,
            replay_patience=0, pool_capacity=8, evaluation="protonet")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    stacked = StackedConv4(4, 1, 4, 5, 16)
    kwargs = {"in_channels": 1, "hidden": 4, "num_classes": 5, "image_size": 16}
    g = torch.Generator().manual_seed(0)
    teachers = [ZooTeacher("", "conv4", kwargs, classes=torch.randperm(8, generator=g)[:5].tolist()) for _ in range(4)]
    return save_zoo(tmp_path_factory.mktemp("zoo"), [stacked.export(i) for i in range(4)], teachers, {"n_classes": 8})


def data() -> FewShotEpisodes:
    return FewShotEpisodes(source="digits", image_size=16, per_class=20, k_shot=1, q_query=2, val_episodes=4,
                           steps_per_epoch=2)


def fit(module: FREEModule, epochs: int, tmp_path: Path, ckpt_path: str | None = None, **kwargs) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                        callbacks=[GradientAlignment(mode="sequential", alpha=2.0, inner_lr=0.01)]
                        + kwargs.pop("callbacks", []), **kwargs)
    trainer.fit(module, datamodule=data(), ckpt_path=ckpt_path)
    return trainer


def test_warmup_trains_only_the_generator(zoo: Path, tmp_path: Path) -> None:
    module = FREEModule(zoo=str(zoo), **{**TINY, "warmup": 2})
    learner = {k: v.clone() for k, v in module.learner.state_dict().items()}
    generator = [p.clone() for p in module.generator.parameters()]
    fit(module, 1, tmp_path, enable_checkpointing=False, limit_val_batches=0)
    assert int(module.pool.count.sum()) == 0 and module.pool.images is None  # nothing recovered into the pool
    assert all(torch.equal(v, learner[k]) for k, v in module.learner.state_dict().items())
    assert any(not torch.equal(p, q) for p, q in zip(module.generator.parameters(), generator))


@pytest.mark.parametrize("last_only", [False, True])
def test_pool_receives_every_teacher_or_the_release_last_one(zoo: Path, tmp_path: Path, last_only: bool) -> None:
    module = FREEModule(zoo=str(zoo), **{**TINY, "warmup": 1, "pool_last_teacher_only": last_only})
    fit(module, 1, tmp_path, enable_checkpointing=False, limit_val_batches=0)  # steps 0 (warm) and 1
    written = (1 if last_only else 2) * 5 * TINY["images_per_class"]
    assert int(module.pool.count.sum()) == written
    ids = torch.randperm(4, generator=__import__("core.rng", fromlist=["x"]).keyed_generator(0, 1, 0))[:2].tolist()
    expected = torch.zeros(8, dtype=torch.long)
    for t in ids[-1:] if last_only else ids:  # the pool holds the sampled teachers' absolute classes
        expected[torch.tensor(module.records[t].classes)] += TINY["images_per_class"]
    assert torch.equal(module.pool.count, expected)


def test_resume_mid_training_equals_an_uninterrupted_run(zoo: Path, tmp_path: Path) -> None:
    full = FREEModule(zoo=str(zoo), **TINY)
    fit(full, 2, tmp_path / "full", enable_checkpointing=False)
    first = FREEModule(zoo=str(zoo), **TINY)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(first, 1, tmp_path / "first", callbacks=[ckpt])
    resumed = FREEModule(zoo=str(zoo), **TINY)
    fit(resumed, 2, tmp_path / "resumed", ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), enable_checkpointing=False)
    assert int(resumed.step_count) == int(full.step_count) == 4
    reference = full.state_dict()
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, reference[name], msg=name)
    torch.testing.assert_close(full.pool.images, resumed.pool.images)
    assert full.best_val == resumed.best_val
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=str(tmp_path / "test"))
    episodes = data()
    episodes.hparams.test_episodes = 3
    trainer.test(resumed, datamodule=episodes)
    saved = json.loads((tmp_path / "test" / "test_episode_accuracies.json").read_text())
    assert saved["accuracies"] == resumed.test_accuracies.tolist() and len(saved["accuracies"]) == 3
    assert all(torch.equal(a, b) for a, b in zip(resumed.learner.state_dict().values(), full.best_state.values()))


def test_release_flags_run_and_alias_the_teachers(zoo: Path, tmp_path: Path) -> None:
    flags = dict(release_kl=True, generator_fresh_adam=True, stale_fast_weights=True, alias_teachers=True,
                 pool_quantize=True, first_order=True)
    module = FREEModule(zoo=str(zoo), **{**TINY, **flags})
    fit(module, 1, tmp_path, enable_checkpointing=False, limit_val_batches=0)
    assert (module.pool.count > 0).sum() == 5  # every "sampled" teacher is the same one: only its 5 classes
    assert module._stale is not None and module.pool.images.dtype == torch.uint8


def test_bad_input_names_the_key(zoo: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="replay_n_way=3 must equal the teachers' class count 5"):
        FREEModule(zoo=str(zoo), **{**TINY, "replay_n_way": 3})
    with pytest.raises(ValueError, match="holdout_teachers=3"):
        FREEModule(zoo=str(zoo), **{**TINY, "holdout_teachers": 3})
    with pytest.raises(FileNotFoundError, match="model.init_args.zoo="):
        FREEModule(zoo=str(tmp_path / "missing"))
    module = FREEModule(zoo=str(zoo), **{**TINY, "teachers_per_step": 1, "images_per_class": 1})
    with pytest.raises(ValueError, match="task pool has 0 classes with k_shot \\+ q_query = 3"):
        fit(module, 1, tmp_path, enable_checkpointing=False, limit_val_batches=0)
    with pytest.raises(ValueError, match="n_way=6"):
        FewShotEpisodes(source="digits", image_size=16, n_way=6).setup("fit")
    with pytest.raises(ValueError, match="k_shot \\+ q_query = 30"):
        FewShotEpisodes(source="digits", image_size=16, per_class=20, k_shot=15, q_query=15).setup("fit")


def test_zoo_models_match_the_manifest_the_module_loaded(zoo: Path) -> None:
    module = FREEModule(zoo=str(zoo), **TINY)
    teachers, records, _ = load_zoo(zoo)
    assert module.classes.tolist() == [r.classes for r in records]
    x = torch.rand(3, 1, 16, 16)
    module.train()  # Lightning's train() must leave the frozen teachers on their running statistics
    torch.testing.assert_close(module.teachers[2](x), teachers[2](x))


@pytest.mark.slow
def test_demo_configs_run_through_the_cli(tmp_path: Path) -> None:
    """fast_dev_run of the zoo stage, then of FREE on the zoo it wrote (glyphs, small overrides)."""
    zoo_dir = tmp_path / "zoo"
    cli_main(["fit", "--config", str(REPO / "configs/free/demo_zoo.yaml"), "--trainer.fast_dev_run=1",
              f"--model.init_args.output_dir={zoo_dir}", "--data.init_args.n_teachers=4",
              "--data.init_args.image_size=16", "--model.init_args.image_size=16", "--model.init_args.hidden=4"])
    records = load_zoo(zoo_dir)[1]
    assert len(records) == 4 and all(len(r.classes) == 5 for r in records)
    cli_main(["fit", "--config", str(REPO / "configs/free/demo.yaml"), "--trainer.fast_dev_run=1",
              f"--model.init_args.zoo={zoo_dir}", "--model.init_args.warmup=0", "--model.init_args.hidden=4",
              "--data.init_args.image_size=16", "--data.init_args.val_episodes=2", "--model.init_args.picture_every=1"])
    assert list(tmp_path.rglob("recovered_step00000.png"))


def test_zoo_stage_keeps_each_teachers_best_epoch_and_exports_it(tmp_path: Path) -> None:
    from datamodules.model_zoo import ZooData
    from lit_modules.model_zoo import ZooModule

    data = ZooData(source="digits", image_size=16, per_class=20, n_teachers=3, classes_per_teacher=3, batch_size=8)
    module = ZooModule(hidden=4, image_size=16, output_dir=str(tmp_path / "zoo"))
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", default_root_dir=str(tmp_path), num_sanity_val_steps=0,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    trainer.fit(module, datamodule=data)
    models, records, meta = load_zoo(tmp_path / "zoo")
    assert meta["n_classes"] == 5 and [r.classes for r in records] == data.teacher_classes.tolist()
    best = module.best_zoo().eval()
    x = torch.rand(4, 1, 16, 16)
    for i, model in enumerate(models):  # the exported file is the teacher's best held-out epoch
        torch.testing.assert_close(model(x), best(x[None].expand(3, -1, -1, -1, -1))[i], atol=1e-5, rtol=1e-4)
        assert records[i].accuracy == pytest.approx(float(module.best_acc[i]))
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert set(saved["zoo_best"]) == set(module.best)


def test_every_generator_iteration_draws_a_new_augmentation(zoo: Path, tmp_path: Path, monkeypatch) -> None:
    """The release re-draws the crop (and flip) at every one of the generator's adaptation iterations;
    a crop fixed per teacher would fit the images to one view only."""
    import lit_modules.free as free

    seen: list[Tensor] = []
    original = free.random_crop_flip

    def spy(images, padding, flip, generator):  # noqa: ANN001, ANN202
        seen.append(generator.get_state())
        return original(images, padding, flip, generator)

    monkeypatch.setattr(free, "random_crop_flip", spy)
    module = FREEModule(zoo=str(zoo), **{**TINY, "warmup": 5, "generator_steps": 3, "teachers_per_step": 1})
    fit(module, 1, tmp_path, enable_checkpointing=False, limit_val_batches=0, max_steps=1)
    assert len(seen) == 3  # one warm-up step: three iterations of one teacher
    assert len({bytes(s.numpy()) for s in seen}) == 3
