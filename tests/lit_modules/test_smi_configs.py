"""Every SMI config runs through the CLI (fast_dev_run) or fails with an error naming what to change."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch

import train
from core.inverted_images import save_inverted_batch, write_manifest
from core.timm_models import export_weights

REPO = Path(__file__).resolve().parents[1].parent
SMI = REPO / "configs" / "smi"
DEMO_VIT = {"img_size": 32, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 96, "depth": 4,
            "num_heads": 3}


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random stand-ins for the demo's teacher, student and inverted pool (wiring, not quality)."""
    root = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **DEMO_VIT)
    weights = export_weights(vit, root / "vit.safetensors")
    cnn = timm.create_model("resnet10t", pretrained=False, in_chans=1, num_classes=122)
    student = export_weights(cnn, root / "cnn.safetensors")
    keep = torch.stack([torch.randperm(64)[:14] for _ in range(8)])
    save_inverted_batch(root / "inverted" / "batch_0000", torch.rand(8, 1, 32, 32), torch.arange(8), keep, (8, 8), 4)
    write_manifest(root / "inverted", [{"file": "batch_0000.pt", "images": 8, "kept_patches": 14}],
                   {"teacher": "vit", "teacher_checkpoint": None, "iterations": 1, "lr": 0.25, "ce_weight": 1.0,
                    "tv_l2_weight": 0.0, "bn_weight": 0.0, "labels": "random", "seed": 0, "prune_iterations": [],
                    "keep_ratios": [], "patches": 64, "return_images": "best", "final_mask": "tracked",
                    "mean": [0.5], "std": [0.5]})
    return {"weights": weights, "student": student, "inverted": root / "inverted"}


def run(config: str, tmp_path: Path, *extra: str) -> train.LightningCLI:
    return train.cli_main(["fit", "--config", str(SMI / config), "--trainer.fast_dev_run=1",
                           f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false", *extra])


@pytest.mark.parametrize("config", ["demo_teacher.yaml", "demo_student.yaml"])
def test_demo_training_stages(config: str, tmp_path: Path) -> None:
    cli = run(config, tmp_path, f"--model.init_args.export_path={tmp_path / 'w.safetensors'}")
    assert cli.trainer.state.finished and (tmp_path / "w.safetensors").is_file()


def test_demo_inversion(demo_files: dict, tmp_path: Path) -> None:
    cli = run("demo.yaml", tmp_path, f"--model.init_args.teacher_checkpoint={demo_files['weights']}",
              f"--model.init_args.output_dir={tmp_path / 'inv'}", "--model.init_args.iterations=32",
              "--model.init_args.batch_size=4", "--trainer.fast_dev_run=32")  # the demo's schedule ends at 30
    assert cli.trainer.global_step == 32 and (tmp_path / "inv" / "batch_0000.pt").is_file()
    assert (tmp_path / "inv" / "manifest.json").is_file() and (tmp_path / "inv" / "README.md").is_file()


@pytest.mark.parametrize("config", ["demo_kd.yaml", "demo_ptq.yaml"])
def test_demo_downstream(config: str, demo_files: dict, tmp_path: Path) -> None:
    weights = demo_files["weights"]
    extra = [f"--data.init_args.inverted_dir={demo_files['inverted']}"]
    if config == "demo_kd.yaml":
        extra += [f"--model.init_args.teacher_checkpoint={weights}",
                  f"--model.init_args.student_checkpoint={demo_files['student']}"]
    else:
        extra += [f"--model.init_args.checkpoint={weights}"]
    cli = run(config, tmp_path, *extra)
    assert cli.trainer.state.finished


@pytest.mark.parametrize("config", sorted(p.name for p in SMI.glob("invert_*.yaml")))
def test_paper_inversion_configs_run_with_random_weights(config: str, tmp_path: Path) -> None:
    cli = run(config, tmp_path, "--model.init_args.pretrained=false", "--model.init_args.teacher_checkpoint=null",
              "--model.init_args.batch_size=1", f"--model.init_args.output_dir={tmp_path}")
    assert cli.trainer.global_step == 1
    assert cli.model.images.shape[-1] == 224


@pytest.mark.parametrize(
    "config,extra,message",
    [
        ("invert_deit_tiny_imagenet.yaml", [], "could not load pretrained weights for 'deit_tiny_patch16_224'"),
        ("invert_kd_deit_tiny_cifar10.yaml", [], "model.init_args.teacher_checkpoint: no file at"),
        ("ptq_deit_tiny_imagenet.yaml", ["--model.init_args.pretrained=false"], "data.init_args.root: no imagenet at"),
        ("kd_deit_base_cifar10.yaml", ["--model.init_args.teacher_checkpoint=null",
                                       "--model.init_args.pretrained_student=false"], "data.init_args.root: no cifar10"),
        ("teacher_deit_tiny_cifar10.yaml", ["--model.init_args.pretrained=false"], "data.init_args.root: no cifar10"),
    ],
)
def test_paper_configs_name_what_is_missing(config, extra, message, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py", "fit", "--config", str(SMI / config), "--trainer.fast_dev_run=1",
                                      f"--trainer.default_root_dir={tmp_path}", *extra])
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
