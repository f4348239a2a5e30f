"""train.py: subcommands, resolved config saved and logged, re-runs, readable configuration errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import train

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "configs" / "smi" / "demo_teacher.yaml"


def tiny_teacher_args(tmp_path: Path) -> list[str]:
    return [
        "fit", "--config", str(TEACHER), "--trainer.max_steps=1", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.version=fixed",
        f"--model.init_args.export_path={tmp_path / 'model.safetensors'}", "--trainer.enable_progress_bar=false",
    ]


@pytest.mark.slow
def test_help_lists_the_subcommands(subprocess_env: dict[str, str]) -> None:
    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True,
                         env=subprocess_env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    for sub in ("fit", "validate", "test", "predict"):
        assert f"    {sub}" in out.stdout


def test_config_is_saved_logged_and_a_rerun_into_the_same_directory_works(tmp_path: Path) -> None:
    for _ in range(2):  # the second run overwrites config.yaml instead of refusing
        cli = train.cli_main(tiny_teacher_args(tmp_path))
    run_dir = Path(cli.trainer.log_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "lit_modules.smi_teacher.ClassifierModule"
    assert saved["seed_everything"] == 0
    logged = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert logged["config"]["model"]["init_args"]["lr"] == saved["model"]["init_args"]["lr"]
    assert (tmp_path / "model.safetensors").is_file()



def test_wandb_receives_the_resolved_config(tmp_path: Path) -> None:
    args = tiny_teacher_args(tmp_path) + [
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger", f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.logger.offline=true", "--trainer.logger.project=litzoo-test",
    ]
    cli = train.cli_main(args)
    config = dict(cli.trainer.logger.experiment.config)["config"]
    assert config["model"]["class_path"] == "lit_modules.smi_teacher.ClassifierModule"
    cli.trainer.logger.experiment.finish()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model.init_args.checkpoint=/nonexistent/teacher.safetensors"], "model.init_args.checkpoint: no file at"),
        (["--data.init_args.dataset=cifar10"], "data.init_args.root must point to a local cifar10 copy"),
    ],
)
def test_configuration_errors_end_in_one_line_and_exit_2(tmp_path, monkeypatch, capsys, extra, message) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py", *tiny_teacher_args(tmp_path), *extra])
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_malformed_yaml_and_missing_config_are_reported(tmp_path, monkeypatch, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: [unclosed\n")
    for path, message in ((bad, "not valid YAML"), (tmp_path / "missing.yaml", "no such file")):
        monkeypatch.setattr(sys, "argv", ["train.py", "fit", "--config", str(path)])
        with pytest.raises(SystemExit) as exit_info:
            train.main()
        assert exit_info.value.code == 2
        assert f"--config {path}: {message}" in capsys.readouterr().err
