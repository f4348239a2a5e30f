"""TGRModule: group-restricted teacher draws, resumption (groups kept, run equal to an uninterrupted one),
bad input, the CLI demo configs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.gradient_alignment import GradientAlignment
from core.model_zoo import ZooTeacher, load_zoo, save_zoo
from core.stacked_conv4 import StackedConv4
from datamodules.tgr import TGRData
from lit_modules.tgr import TGRModule
from train import cli_main

REPO = Path(__file__).resolve().parents[2]
TINY = dict(hidden=4, nz=8, ngf=4, n_groups=2, teachers_per_step=2, images_per_class=4, inversion_steps=2,
            augment_flip=False, replay_n_way=2, replay_k_shot=1, replay_q_query=2, episode_batch=2,
            replay_batches=1, replay_patience=0, pool_capacity=8, probe_hidden=4, probe_epochs=1,
            embedding_images_per_class=4, embedding_steps=2, evaluation="protonet", cosine_every=1)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    stacked = StackedConv4(4, 1, 4, 2, 16)
    kwargs = {"in_channels": 1, "hidden": 4, "num_classes": 2, "image_size": 16}
    classes = [[0, 1], [1, 2], [2, 0], [0, 2]]  # digits 0-2; 3 and 4 are the probe's classes
    teachers = [ZooTeacher("", "conv4", kwargs, classes=c, class_names=[str(k) for k in c]) for c in classes]
    return save_zoo(tmp_path_factory.mktemp("zoo"), [stacked.export(i) for i in range(4)], teachers,
                    {"source": "digits", "n_classes": 5})


def data(probe_classes: int = 2) -> TGRData:
    return TGRData(source="digits", image_size=16, per_class=20, n_way=2, k_shot=1, q_query=2, val_episodes=4,
                   steps_per_epoch=2, probe_classes=probe_classes, probe_per_class=10)


def fit(module: TGRModule, epochs: int, tmp_path: Path, ckpt_path: str | None = None, probe_classes: int = 2,
        **kwargs) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                        callbacks=[GradientAlignment(mode="displacement", alpha=0.1)] + kwargs.pop("callbacks", []),
                        **kwargs)
    trainer.fit(module, datamodule=data(probe_classes), ckpt_path=ckpt_path)
    return trainer


def test_every_step_draws_its_teachers_from_one_group(zoo: Path, tmp_path: Path) -> None:
    module = TGRModule(zoo=str(zoo), embedding_cache=str(tmp_path / "cache"), **TINY)
    fit(module, 1, tmp_path)
    assert sorted(m for g in module.groups for m in g) == [0, 1, 2, 3] and len(module.groups) == 2
    assert module.similarity.shape == (4, 4) and torch.equal(module.similarity, module.similarity.T)
    for step in range(30):
        group, ids = module.draw_teachers(step)
        assert set(ids) <= set(module.groups[group])
    assert len(module.cosine_curve) == 2 and list(tmp_path.rglob("heterogeneity.png"))
    assert len(list((tmp_path / "cache" / "embeddings").iterdir())) == 4  # one cached embedding per teacher


def test_resume_keeps_the_groups_and_equals_an_uninterrupted_run(zoo: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cache = str(tmp_path / "cache")
    full = TGRModule(zoo=str(zoo), embedding_cache=cache, **TINY)
    fit(full, 2, tmp_path / "full")
    first = TGRModule(zoo=str(zoo), embedding_cache=cache, **TINY)
    fit(first, 1, tmp_path / "a", callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    resumed = TGRModule(zoo=str(zoo), embedding_cache=cache, **TINY)

    def no_regrouping() -> None:
        raise AssertionError("a resumed run recomputed its groups")

    monkeypatch.setattr(resumed, "_compute_groups", no_regrouping)
    fit(resumed, 2, tmp_path / "b", ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.groups == full.groups
    for (name, a), b in zip(full.learner.state_dict().items(), resumed.learner.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert int(resumed.step_count) == 4


def test_bad_input_names_the_key(zoo: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_groups=5 but the zoo gives 4 teachers"):
        TGRModule(zoo=str(zoo), **{**TINY, "n_groups": 5})
    with pytest.raises(ValueError, match="grouping='clustered'"):
        TGRModule(zoo=str(zoo), **{**TINY, "grouping": "clustered"})
    module = TGRModule(zoo=str(zoo), embedding_cache="", **TINY)
    with pytest.raises(ValueError, match="probe's head has 1 outputs but the teachers have 2 classes"):
        fit(module, 1, tmp_path, probe_classes=1)  # a 1-class probe cannot read the teachers' two labels
    with pytest.raises(FileNotFoundError, match="model.init_args.probe=missing.pth"):
        fit(TGRModule(zoo=str(zoo), embedding_cache="", **{**TINY, "probe": "missing.pth"}), 1, tmp_path)


@pytest.mark.slow
def test_demo_configs_run_through_the_cli(tmp_path: Path) -> None:
    """fast_dev_run of the zoo stage (probe classes reserved), then of TGR on the zoo it wrote."""
    zoo_dir = tmp_path / "zoo"
    cli_main(["fit", "--config", str(REPO / "configs/tgr/demo_zoo.yaml"), "--trainer.fast_dev_run=1",
              f"--model.init_args.output_dir={zoo_dir}", "--data.init_args.n_teachers=4", "--trainer.logger=false",
              "--data.init_args.image_size=16", "--model.init_args.image_size=16", "--model.init_args.hidden=4"])
    records = load_zoo(zoo_dir)[1]
    assert len(records) == 4 and all(max(r.classes) < 78 - 12 for r in records)  # reserved classes untouched
    cli_main(["fit", "--config", str(REPO / "configs/tgr/demo.yaml"), "--trainer.fast_dev_run=1",
              f"--model.init_args.zoo={zoo_dir}", "--model.init_args.hidden=4", "--model.init_args.n_groups=2",
              f"--model.init_args.embedding_cache={tmp_path / 'cache'}", "--model.init_args.embedding_steps=2",
              "--model.init_args.inversion_steps=2", "--model.init_args.probe_epochs=1", "--trainer.logger=false",
              f"--trainer.default_root_dir={tmp_path / 'run'}", "--data.init_args.image_size=16",
              "--data.init_args.val_episodes=2", "--data.init_args.probe_per_class=10"])
    assert list((tmp_path / "run").rglob("heterogeneity.png"))
