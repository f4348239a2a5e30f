"""Every YAML under configs/ parses with ``--print_config``, composed with the base files it names.

A method config states what it is meant to be composed with in a header line
``# compose: configs/_base/trainer_gpu.yaml configs/_base/logger_wandb.yaml``; the _base files are
checked on top of the SMI demo config.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from train import cli_main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "_base" not in p.parts)
BASES = sorted((REPO / "configs" / "_base").glob("*.yaml"))
ANCHOR = REPO / "configs" / "smi" / "demo.yaml"


def composed_with(config: Path) -> list[Path]:
    """The _base files named on the config's ``# compose:`` header line."""
    match = re.search(r"^# compose:(.*)$", config.read_text(), flags=re.MULTILINE)
    return [REPO / name for name in match.group(1).split()] if match else []


def print_config(files: list[Path], capsys: pytest.CaptureFixture[str]) -> dict:
    args = ["fit"] + [a for f in files for a in ("--config", str(f))] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    out = capsys.readouterr().out
    assert exit_info.value.code in (0, None), out
    return yaml.safe_load(out)


def test_there_are_configs() -> None:
    assert CONFIGS and BASES


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_method_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bases = composed_with(config)
    for base in bases:
        assert base.is_file(), f"{config.name} names a missing base file {base}"
    resolved = print_config(bases + [config], capsys)
    assert resolved["model"]["class_path"]
    # What the config sets must survive composition: the last file wins.
    own = yaml.safe_load(config.read_text())
    for key, value in (own.get("model", {}).get("init_args") or {}).items():
        assert resolved["model"]["init_args"][key] == value, key


@pytest.mark.parametrize("base", BASES, ids=lambda p: p.name)
def test_base_config_composes(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    resolved = print_config([ANCHOR, base], capsys)
    for key, value in yaml.safe_load(base.read_text())["trainer"].items():
        got = resolved["trainer"][key]
        if isinstance(value, dict) and "class_path" in value:
            assert got["class_path"] == value["class_path"], key
        else:
            assert got == value, key


def test_unknown_class_path_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--model", "lit_modules.smi.NoSuchModule", "--print_config"])
    assert exit_info.value.code == 2
    assert "NoSuchModule" in capsys.readouterr().err
