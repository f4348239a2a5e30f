"""The paper configs run on a tiny fake folder tree (the standard split layout), and fail clearly without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.model_zoo import load_zoo
from train import cli_main

REPO = Path(__file__).resolve().parents[2]


def _fake_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n_classes in (("meta_train", 6), ("meta_val", 5), ("meta_test", 5)):
        for c in range(n_classes):
            folder = root / split / f"n{c:03d}"
            folder.mkdir(parents=True)
            for i in range(10):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.mark.parametrize("setting", ["cifar_fs", "miniimagenet", "cub"])
def test_paper_configs_run_on_the_standard_layout(setting: str, tmp_path: Path) -> None:
    root = tmp_path / "data"
    _fake_tree(root)
    small = ["--trainer.fast_dev_run=1", "--trainer.precision=32-true", f"--data.init_args.root={root}",
             "--data.init_args.image_size=16", "--model.init_args.hidden=4"]
    zoo = tmp_path / "zoo"
    cli_main(["fit", "--config", str(REPO / f"configs/free/{setting}_zoo.yaml"), *small,
              "--model.init_args.image_size=16", "--data.init_args.n_teachers=4", f"--model.init_args.output_dir={zoo}"])
    assert len(load_zoo(zoo)[0]) == 4
    cli_main(["fit", "--config", str(REPO / f"configs/free/{setting}.yaml"), *small, f"--model.init_args.zoo={zoo}",
              "--model.init_args.warmup=0", "--model.init_args.nz=8", "--model.init_args.ngf=4",
              "--model.init_args.images_per_class=4", "--model.init_args.replay_k_shot=1",
              "--model.init_args.replay_q_query=2", "--model.init_args.replay_batches=1",
              "--data.init_args.k_shot=1", "--data.init_args.q_query=2", "--data.init_args.val_episodes=2",
              "--model.init_args.test_steps=1"])


def test_missing_dataset_root_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data.init_args.root=.*no meta_train/ folder"):
        cli_main(["fit", "--config", str(REPO / "configs/free/cifar_fs_zoo.yaml"), "--trainer.fast_dev_run=1",
                  "--trainer.precision=32-true", f"--data.init_args.root={tmp_path / 'nothing'}"])
