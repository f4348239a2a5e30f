"""Every ASP config through the CLI (in-process ``fast_dev_run``): the pre-training stage, the demo, the
baseline overlays; the paper configs fail fast, naming the key, when their data is not on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from train import cli_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "asp"
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.fast_dev_run=true"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("asp_pretrain")
    path = root / "backbone.safetensors"
    cli_main(["fit", "--config", str(CONFIGS / "demo_pretrain.yaml"), *QUIET, f"--trainer.default_root_dir={root}",
              f"--model.init_args.export_path={path}", "--data.init_args.glyph_per_class=15"])
    return path


def test_the_pretraining_stage_exports_a_headless_backbone(backbone: Path) -> None:
    state = load_file(str(backbone))
    assert "patch_embed.proj.weight" in state and not any(k.startswith("head") for k in state)


@pytest.mark.slow
@pytest.mark.parametrize("overlay", [None, "simplecil", "vpt", "l2p", "no_anchor", "no_kl"])
def test_the_demo_and_every_baseline_overlay_run(overlay: str | None, backbone: Path, tmp_path: Path) -> None:
    extra = ["--config", str(CONFIGS / f"{overlay}.yaml")] if overlay else []
    cli = cli_main(["fit", "--config", str(CONFIGS / "demo.yaml"), *extra, *QUIET,
                    f"--trainer.default_root_dir={tmp_path}", f"--model.init_args.backbone_checkpoint={backbone}",
                    "--model.init_args.eval_each_epoch=true",  # one base epoch only: evaluate it
                    "--data.init_args.glyph_per_class=8", "--data.init_args.test_per_class=2"])
    assert cli.model.hparams.prompts == {None: "asp", "simplecil": "none", "no_anchor": "asp",
                                         "no_kl": "asp"}.get(overlay, overlay)
    logged = cli.trainer.callback_metrics
    assert "val/acc" in logged and ("train/ce" in logged) == (overlay != "simplecil")


@pytest.mark.parametrize("config", ["cifar100", "cub200", "imagenet_r"])
def test_paper_configs_name_the_missing_dataset_root(config: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--config", str(CONFIGS / f"{config}.yaml"), *QUIET, f"--trainer.default_root_dir={tmp_path}",
            f"--data.init_args.root={tmp_path / 'absent'}", "--model.init_args.pretrained=false",
            "--model.init_args.backbone=vit_tiny_patch16_224"]
    with pytest.raises((FileNotFoundError, ValueError, SystemExit)) as error:  # at instantiation or by the parser
        cli_main(args, run=False)
    assert "data.init_args.root: no local" in str(error.value) + capsys.readouterr().err
