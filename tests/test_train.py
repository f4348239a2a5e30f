"""train.py: discovery, the saved and logged config, run folders that are never reused silently, resume."""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import pytest
import yaml

import train
from cli.discovery import registry
from cli.wandb_logger import wandb_offline

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "configs" / "smi" / "demo_teacher.yaml"


def tiny_teacher_args(tmp_path: Path, steps: int = 1, version: str | None = "fixed") -> list[str]:
    args = [
        "fit", "--config", str(TEACHER), f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=cli.csv_logger.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}", "--trainer.logger.name=teacher", "--trainer.log_every_n_steps=1",
        f"--model.init_args.export_path={tmp_path / 'model.safetensors'}", "--trainer.enable_progress_bar=false",
    ]
    return args + ([f"--trainer.logger.version={version}"] if version else [])


def test_help_lists_every_method_data_module_and_callback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in out
    names = [e.name for e in registry()]
    assert {"SMIModule", "BDSModule", "ClassIncrementalStream", "RefreshLearning"} <= set(names)
    for name in names:
        assert f"    {name} " in out, name


def test_short_class_names_resolve(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train.cli_main(["fit", "--model", "ClassifierModule", "--data", "SMIDataModule", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lit_modules.smi_teacher.ClassifierModule"
    assert printed["data"]["class_path"] == "datamodules.smi.SMIDataModule"


def test_config_paths_resolve_from_any_folder(tmp_path: Path) -> None:
    argv = train.resolve_config_paths(["fit", "--config", "configs/smi/demo.yaml", "--config=configs/_base/trainer_cpu.yaml"])
    assert argv[2] == str(REPO / "configs/smi/demo.yaml") and argv[3] == f"--config={REPO / 'configs/_base/trainer_cpu.yaml'}"
    local = tmp_path / "mine.yaml"
    local.write_text("seed_everything: 1\n")
    assert train.resolve_config_paths(["--config", str(local)]) == ["--config", str(local)]


@pytest.mark.slow
def test_config_is_saved_and_logged_and_a_used_run_folder_is_refused(tmp_path: Path) -> None:
    cli = train.cli_main(tiny_teacher_args(tmp_path))
    run_dir = tmp_path / "teacher" / "fixed"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "lit_modules.smi_teacher.ClassifierModule" and saved["seed_everything"] == 0
    logged = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert logged["config"]["model"]["init_args"]["lr"] == saved["model"]["init_args"]["lr"]
    assert cli.trainer.log_dir == str(run_dir)
    before = (run_dir / "metrics.csv").read_text()
    with pytest.raises(FileExistsError, match="--overwrite true"):
        train.cli_main(tiny_teacher_args(tmp_path))
    assert (run_dir / "metrics.csv").read_text() == before  # nothing of the earlier run was touched
    train.cli_main(tiny_teacher_args(tmp_path) + ["--overwrite=true"])


@pytest.mark.slow
def test_ckpt_path_last_resumes_into_the_same_folder_and_appends_metrics(tmp_path: Path) -> None:
    first = train.cli_main(tiny_teacher_args(tmp_path, steps=2, version=None) + ["--trainer.enable_checkpointing=true"])
    run_dir = Path(first.trainer.log_dir)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    with pytest.raises(ValueError, match="model.init_args.lr=0.5 .*conflicts with the checkpoint"):
        train.cli_main(tiny_teacher_args(tmp_path, steps=4, version=None)
                       + ["--trainer.enable_checkpointing=true", "--ckpt_path=last", "--model.init_args.lr=0.5"])
    resumed = train.cli_main(tiny_teacher_args(tmp_path, steps=4, version=None)
                             + ["--trainer.enable_checkpointing=true", "--ckpt_path=last"])
    assert resumed.trainer.global_step == 4 and Path(resumed.trainer.log_dir) == run_dir
    steps = [int(row["step"]) for row in csv.DictReader((run_dir / "metrics.csv").open()) if row.get("train/loss")]
    assert steps[0] == 0 and max(steps) == 3  # the rows of the first two steps were kept
    assert (run_dir / "config.yaml").is_file() and (run_dir / "config.resume-1.yaml").is_file()


def test_ckpt_path_last_without_a_checkpoint_is_explained(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_teacher_args(tmp_path) + ["--ckpt_path=last"])
    assert exit_info.value.code == 2 and "--ckpt_path last: no last.ckpt" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "netrc", "offline"),
    [({}, False, True), ({"WANDB_API_KEY": "k"}, False, False), ({}, True, False),
     ({"WANDB_MODE": "offline", "WANDB_API_KEY": "k"}, True, True), ({"WANDB_MODE": "online"}, False, False)],
)
def test_wandb_mode_follows_the_users_setup(tmp_path, monkeypatch, env, netrc, offline) -> None:
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    path = tmp_path / "netrc"
    path.write_text("machine api.wandb.ai\n  login user\n  password secret\n" if netrc else "")
    monkeypatch.setenv("NETRC", str(path))
    assert wandb_offline() is offline


def test_importing_train_leaves_wandb_mode_alone() -> None:
    import importlib
    import os

    saved = os.environ.pop("WANDB_MODE", None)
    try:
        importlib.reload(train)
        assert "WANDB_MODE" not in os.environ
    finally:
        if saved is not None:
            os.environ["WANDB_MODE"] = saved


@pytest.mark.slow
def test_wandb_run_gets_config_and_metrics_in_its_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = tiny_teacher_args(tmp_path, version=None) + [
        "--config", str(REPO / "configs" / "_base" / "logger_wandb.yaml"), f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.logger.project=litzoo-test"]
    cli = train.cli_main(args)
    run = cli.trainer.logger.experiment
    assert dict(run.config)["config"]["model"]["class_path"] == "lit_modules.smi_teacher.ClassifierModule"
    assert "train/loss" in dict(run.summary)
    assert (tmp_path / "litzoo-test" / run.id / "config.yaml").is_file()
    assert not (tmp_path / "config.yaml").exists()
    run.finish()


def test_malformed_yaml_and_missing_config_are_reported(tmp_path, monkeypatch, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: [unclosed\n")
    for path, message in ((bad, "not valid YAML"), (tmp_path / "missing.yaml", "no such file")):
        with pytest.raises(SystemExit) as exit_info:
            train.main(["fit", "--config", str(path)])
        assert exit_info.value.code == 2
        assert f"--config {path}: {message}" in capsys.readouterr().err


def test_console_script_is_declared() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["litzoo"] == "train:main"
    assert sys.modules["train"].main is train.main


def test_print_config_with_comments_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--model", "ClassifierModule", "--print_config=comments"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert re.search(r"#.*\n\s+lr: ", out), "the model's lr has no documentation comment"
    assert sys.argv == ["train.py"]  # main restores the argv it hid from LightningCLI
