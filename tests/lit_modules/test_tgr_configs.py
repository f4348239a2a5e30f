"""The paper configs of the heterogeneous zoos on a tiny fake folder tree: a multi-architecture zoo built and
combined, FREE run on it, and TGR's paper probe failing clearly when its weight file is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.model_zoo import combine_zoos, load_zoo
from core.resnet import ResNet
from tests.lit_modules.test_free_configs import _fake_tree
from train import cli_main

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--trainer.fast_dev_run=1", "--trainer.precision=32-true", "--data.init_args.image_size=16",
         "--data.init_args.n_teachers=2"]


@pytest.mark.slow
def test_multi_arch_zoo_combines_and_feeds_free_and_tgr(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _fake_tree(root)
    conv4, resnet = tmp_path / "conv4", tmp_path / "resnet10"
    cli_main(["fit", "--config", str(REPO / "configs/free/cifar_fs_zoo.yaml"), *SMALL, f"--data.init_args.root={root}",
              "--model.init_args.image_size=16", "--model.init_args.hidden=4", f"--model.init_args.output_dir={conv4}"])
    cli_main(["fit", "--config", str(REPO / "configs/free/multi_arch_zoo.yaml"), *SMALL, f"--data.init_args.root={root}",
              "--model.init_args.image_size=16", "--model.init_args.arch=resnet10", "--model.init_args.width=2",
              f"--model.init_args.output_dir={resnet}"])
    zoo = tmp_path / "zoo"
    combine_zoos([conv4, resnet], zoo)
    models, records, meta = load_zoo(zoo)
    assert [r.arch for r in records] == ["conv4", "conv4", "resnet10", "resnet10"] and isinstance(models[2], ResNet)
    assert meta["n_classes"] == 6  # one domain: the class ids are shared
    cli_main(["fit", "--config", str(REPO / "configs/free/multi_arch.yaml"), "--trainer.fast_dev_run=1",
              "--trainer.precision=32-true", f"--data.init_args.root={root}", "--data.init_args.image_size=16",
              f"--model.init_args.zoo={zoo}", "--model.init_args.hidden=4", "--model.init_args.warmup=0",
              "--model.init_args.nz=8", "--model.init_args.ngf=4", "--model.init_args.images_per_class=4",
              "--model.init_args.replay_k_shot=1", "--model.init_args.replay_q_query=2",
              "--model.init_args.replay_batches=1", "--model.init_args.teachers_per_step=2",
              "--data.init_args.k_shot=1", "--data.init_args.q_query=2", "--data.init_args.val_episodes=2",
              "--model.init_args.test_steps=1"])
    with pytest.raises(FileNotFoundError, match="model.init_args.probe=.*no such weight file"):
        cli_main(["fit", "--config", str(REPO / "configs/tgr/multi_arch.yaml"), "--trainer.fast_dev_run=1",
                  "--trainer.precision=32-true", f"--data.init_args.root={root}", "--data.init_args.image_size=16",
                  f"--model.init_args.zoo={zoo}", "--model.init_args.n_groups=2", "--data.init_args.k_shot=1",
                  "--data.init_args.q_query=2", "--data.init_args.val_episodes=2",
                  f"--model.init_args.probe={tmp_path / 'resnet34.pth'}"])
