"""litzoo command line: every method's LightningModule and DataModule, assembled from YAML.

    python train.py fit --config configs/smi/demo.yaml
    python train.py fit --config configs/_base/trainer_gpu.yaml --config configs/smi/deit_tiny_ptq_w4a8.yaml
    python train.py fit --model lit_modules.smi.SMIModule --print_config   # every option with defaults

From a notebook: ``from train import cli_main; cli = cli_main(["fit", "--config", "configs/smi/demo.yaml"])``.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import yaml

# Logging stays local unless the user opts in (export WANDB_MODE=online); set before wandb is imported.
os.environ.setdefault("WANDB_MODE", "offline")

from lightning.pytorch import LightningModule  # noqa: E402
from lightning.pytorch.cli import ArgsType, LightningCLI  # noqa: E402

from callbacks.save_config import LoggerSaveConfigCallback  # noqa: E402

DEFAULT_SEED = 0


def cli_main(args: ArgsType = None, run: bool = True) -> LightningCLI:
    """Parse ``args`` (a list of strings or a nested dict; ``None`` reads ``sys.argv``) and run it.

    Any LightningModule/LightningDataModule subclass is accepted by its full ``class_path``. The resolved
    config is saved as ``config.yaml`` in the run directory (re-running into the same directory
    overwrites it) and handed to the loggers. ``run=False`` only instantiates (then call
    ``cli.trainer.fit(cli.model, datamodule=cli.datamodule)`` yourself).
    """
    return LightningCLI(
        LightningModule,
        None,  # any LightningDataModule subclass, and optional: some modules bring their own data
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=LoggerSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=DEFAULT_SEED,
        args=args,
        run=run,
    )


def check_config_files(argv: Sequence[str]) -> None:
    """Fail early, naming the file, when a ``--config`` file is missing or is not valid YAML."""
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            path = Path(argv[i + 1])
        elif arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1])
        else:
            continue
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"--config {path}: not valid YAML ({err})".replace("\n", " ")) from err


def main() -> None:
    """Console entry point: configuration mistakes end in one readable line and exit code 2."""
    try:
        check_config_files(sys.argv[1:])
        cli_main()
    except (FileNotFoundError, ValueError, TypeError) as err:
        if os.environ.get("LITZOO_DEBUG"):
            raise
        where = traceback.extract_tb(err.__traceback__)[-1]
        print(
            f"error: {err}\n(raised at {where.filename}:{where.lineno}; set LITZOO_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
