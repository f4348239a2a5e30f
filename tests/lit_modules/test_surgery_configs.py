"""Every surgery config runs through the CLI (fast_dev_run) or fails fast naming what to change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import train
from core.timm_models import export_weights

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "surgery"
DEMO_VIT = {"img_size": 32, "patch_size": 8, "in_chans": 1, "num_classes": 48, "embed_dim": 64, "depth": 4, "num_heads": 2}
DEMO_CLASSES = {"glyphs_a": 12, "glyphs_b": 12, "glyphs_c": 10, "rotation": 4, "digits": 10}


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Random stand-ins for the demo's theta_0 and experts (wiring, not quality)."""
    root = tmp_path_factory.mktemp("surgery_demo")
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", **DEMO_VIT)
    export_weights(base, root / "pre.safetensors")
    experts = {}
    for task, classes in DEMO_CLASSES.items():
        save_file({k: v + 0.01 * torch.randn_like(v) for k, v in base.state_dict().items()}, str(root / f"{task}.safetensors"))
        save_file({"weight": torch.randn(classes, 48)}, str(root / f"{task}.head.safetensors"))
        experts[task] = str(root / f"{task}.safetensors")
    return {"pre": str(root / "pre.safetensors"), "experts": experts, "root": root}


def run(configs: list[str], tmp_path: Path, *extra: str) -> train.LightningCLI:
    args = ["fit"] + [a for c in configs for a in ("--config", str(CONFIGS / c))]
    return train.cli_main(args + ["--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}",
                                  "--trainer.logger=false", "--trainer.enable_progress_bar=false", *extra])


@pytest.mark.parametrize("overlay", [None, "demo_expert_rotation.yaml", "demo_expert_glyphs_c.yaml"])
def test_demo_expert_stages(demo_files: dict, tmp_path: Path, overlay: str | None) -> None:
    configs = ["demo_expert.yaml"] + ([overlay] if overlay else [])
    out = tmp_path / "expert.safetensors"
    cli = run(configs, tmp_path, f"--model.init_args.checkpoint={demo_files['pre']}", f"--model.init_args.export_path={out}")
    assert cli.trainer.state.finished and out.is_file() and (tmp_path / "expert.head.safetensors").is_file()
    head = cli.model.head.weight / 100  # frozen orthonormal prototype head, x 100
    torch.testing.assert_close(head @ head.T, torch.eye(head.shape[0]), atol=1e-4, rtol=0)
    assert not cli.model.head.weight.requires_grad


def test_demo_pretrain_stage(tmp_path: Path) -> None:
    out = tmp_path / "pre.safetensors"
    cli = run(["demo_pretrain.yaml"], tmp_path, f"--model.init_args.export_path={out}")
    assert cli.trainer.state.finished and out.is_file() and cli.model.head.weight.requires_grad


@pytest.mark.parametrize("configs", [["demo.yaml"], ["demo.yaml", "demo_v1.yaml"], ["demo_adamerging.yaml"]])
def test_demo_merge_and_surgery_stages(demo_files: dict, tmp_path: Path, configs: list[str]) -> None:
    extra = [f"--model.init_args.pretrained_checkpoint={demo_files['pre']}",
             f"--model.init_args.experts={json.dumps(demo_files['experts'])}"]
    if configs == ["demo_adamerging.yaml"]:
        extra.append(f"--model.init_args.export_path={tmp_path / 'merged.safetensors'}")
    cli = run(configs, tmp_path, *extra)
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    if configs == ["demo_adamerging.yaml"]:
        merged = tmp_path / "merged.safetensors"
        assert merged.is_file()
        cli = run(["demo.yaml", "demo_adamerging_surgery.yaml"], tmp_path, *extra[:2],
                  f"--model.init_args.merged_checkpoint={merged}")
        assert cli.trainer.state.finished
    else:
        assert len(cli.model.surgery["glyphs_a"]) == (5 if "demo_v1.yaml" not in configs else 1)
        export = tmp_path / "export"  # the run's artefacts: weights, card, figures
        assert {p.name for p in export.iterdir()} >= {"merged.safetensors", "surgery.safetensors", "README.md",
                                                       "bias_per_layer.png", "accuracy.png"}
        from safetensors.torch import load_file
        merged = load_file(str(export / "merged.safetensors"))
        assert all(torch.equal(merged[k], v) for k, v in cli.model.merged.state_dict().items())
        assert set(load_file(str(export / "surgery.safetensors"))) == set(cli.model.surgery.state_dict())
        card = (export / "README.md").read_text()  # the shared model card: front matter, per-task table, config
        assert card.startswith("---\nlibrary_name: litzoo") and "base_model: " in card
        assert "## Accuracy per task (test)" in card and "| glyphs_a |" in card and "## Configuration" in card


@pytest.mark.parametrize("config", ["vit_b32_expert.yaml", "vit_b32_adamerging.yaml", "vit_b16_surgery.yaml",
                                    "vit_l14_surgery_v2.yaml"])
def test_paper_configs_fail_fast_without_weights_or_data(config: str, tmp_path: Path) -> None:
    with pytest.raises((RuntimeError, ValueError), match="could not load pretrained weights"):
        run([config], tmp_path)


def test_paper_config_names_the_missing_expert(tmp_path: Path) -> None:
    with pytest.raises((FileNotFoundError, ValueError), match="model.init_args.experts.SUN397: no file at /data/surgery/ViT-B-32"):
        run(["vit_b32_surgery.yaml"], tmp_path, "--model.init_args.pretrained=false")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random CLIP text tower (projection 48, the demo ViT's width) with the real CLIP tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from datamodules.sources import clip_tokenizer

    root = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=48)
    CLIPTextModelWithProjection(config).save_pretrained(root)
    clip_tokenizer().save_pretrained(root)
    return str(root)


def test_expert_with_a_zero_shot_text_head(demo_files: dict, tiny_clip: str, tmp_path: Path) -> None:
    from core.zero_shot_head import clip_text_encoder, zero_shot_head

    out = tmp_path / "digits.safetensors"
    cli = run(["demo_expert.yaml", "demo_expert_digits.yaml"], tmp_path, f"--model.init_args.checkpoint={demo_files['pre']}",
              f"--model.init_args.export_path={out}", "--model.init_args.head=zero_shot",
              f"--model.init_args.text_encoder={tiny_clip}", '--model.init_args.templates=["a photo of the digit {}."]')
    expected = zero_shot_head(clip_text_encoder(tiny_clip), [str(d) for d in range(10)], ["a photo of the digit {}."])
    head = cli.model.head.weight
    assert not head.requires_grad and torch.allclose(head, expected)  # built from the class names, unchanged by training
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(tmp_path / "digits.head.safetensors"))["weight"], head)
    with pytest.raises(ValueError, match="num_classes is 4 but task 'digits' has 10"):
        run(["demo_expert.yaml", "demo_expert_digits.yaml"], tmp_path, f"--model.init_args.checkpoint={demo_files['pre']}",
            "--model.init_args.head=zero_shot",
            f"--model.init_args.text_encoder={tiny_clip}", "--model.init_args.num_classes=4")
    with pytest.raises(ValueError, match="text_encoder is required"):
        run(["demo_expert.yaml"], tmp_path, "--model.init_args.head=zero_shot")
