"""Test harness: offline, every run under tmp_path, clean environments for subprocesses."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub / wandb: no network, no hub retries, no uploads.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "JSONARGPARSE_DEPRECATION_WARNINGS": "off",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Variables a DDP run leaves behind; a subprocess inheriting them joins the wrong process group.
DDP_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK",
                 "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_run_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its tmp_path (Lightning's default run dirs, W&B files); argv has no pytest flags.

    Tests therefore name repository files by absolute path (``REPO / "configs" / ...``).
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["train.py"])


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """The environment for a child process: offline variables kept, DDP variables removed."""
    env = {k: v for k, v in os.environ.items() if k not in DDP_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def run_overrides(tmp_path: Path) -> list[str]:
    """CLI arguments that send a run's outputs (logs, checkpoints, config) into tmp_path."""
    return [
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ]
