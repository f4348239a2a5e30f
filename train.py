"""litzoo command line (also installed as ``litzoo``): every method's LightningModule and DataModule from YAML.

    python train.py fit --config configs/smi/demo.yaml
    python train.py fit --config configs/_base/trainer_gpu.yaml --config configs/smi/ptq_deit_tiny_imagenet.yaml
    python train.py --help                                      # the methods, data modules and callbacks
    python train.py fit --model SMIModule --print_config=comments   # every option, documented

From a notebook: ``from train import cli_main; cli = cli_main(["fit", "--config", "configs/smi/demo.yaml"])``.
Config paths are read relative to the current folder; run from the repository, or give absolute paths
(``litzoo fit --config $(python -c "import train; print(train.REPO)")/configs/smi/demo.yaml``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import ArgsType

from callbacks.save_config import LoggerSaveConfigCallback
from cli.discovery import help_epilog, import_named
from cli.errors import config_files, explain_exception, explain_parse_error
from cli.lightning_cli import HelpFormatter, LitzooCLI

DEFAULT_SEED = 0
REPO = Path(__file__).resolve().parent


def cli_main(args: ArgsType = None, run: bool = True, exit_on_error: bool = True) -> LitzooCLI:
    """Parse ``args`` (a list of strings or a nested dict; ``None`` reads ``sys.argv``) and run it.

    A class is given by its ``class_path`` or its short name (``--model SMIModule``). The resolved config is
    saved as ``config.yaml`` in the run's own folder and handed to the loggers; a folder that holds an earlier
    run is refused unless ``--overwrite true``. ``run=False`` only instantiates (then call
    ``cli.trainer.fit(cli.model, datamodule=cli.datamodule)`` yourself). ``exit_on_error=False`` raises
    parse errors instead of printing usage and exiting (``main`` turns them into one short message).
    """
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
    texts = argv + [path.read_text() for path in config_files(argv) if path.is_file()]
    import_named(texts)  # short class names resolve once their module is imported
    return LitzooCLI(
        LightningModule,
        None,  # any LightningDataModule subclass, and optional: some modules bring their own data
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=LoggerSaveConfigCallback,
        seed_everything_default=DEFAULT_SEED,
        parser_kwargs={"exit_on_error": exit_on_error, "allow_abbrev": False, "epilog": help_epilog(),
                       "formatter_class": HelpFormatter},
        args=args,
        run=run,
    )


def resolve_config_paths(argv: Sequence[str]) -> list[str]:
    """``--config`` paths that do not exist from the current folder but do in the repository point there, so
    ``litzoo fit --config configs/smi/demo.yaml`` works from any folder (outputs still go to the current one)."""
    out = list(argv)
    for i, arg in enumerate(out):
        flag, value = (arg, out[i + 1] if i + 1 < len(out) else None) if arg in ("--config", "-c") else ("", None)
        if arg.startswith("--config="):
            flag, value = "--config=", arg.split("=", 1)[1]
        if value is None or Path(value).is_file() or not (REPO / value).is_file():
            continue
        if flag == "--config=":
            out[i] = f"--config={REPO / value}"
        else:
            out[i + 1] = str(REPO / value)
    return out


def check_config_files(argv: Sequence[str]) -> None:
    """Fail early, naming the file, when a ``--config`` file is missing or is not valid YAML."""
    for path in config_files(argv):
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file (paths are relative to {Path.cwd()})")
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"--config {path}: not valid YAML ({err})".replace("\n", " ")) from err


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: bad input ends in a short message (exit code 2); ``--verbose`` shows everything."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv or bool(os.environ.get("LITZOO_DEBUG"))
    argv = resolve_config_paths([arg for arg in argv if arg != "--verbose"])
    program, sys.argv = sys.argv, sys.argv[:1]  # the CLI reads ``argv`` only (not sys.argv twice)
    try:
        check_config_files(argv)
        cli_main(argv, exit_on_error=False)
    except argparse.ArgumentError as err:
        if verbose:
            raise
        _fail(explain_parse_error(str(err), argv))
    except (FileNotFoundError, FileExistsError, ValueError, TypeError, KeyError, MisconfigurationException) as err:
        if verbose:
            raise
        _fail(explain_exception(err, argv))
    finally:
        sys.argv = program


def _fail(message: str) -> None:
    print(f"{message}\n  (--verbose for the full message)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
