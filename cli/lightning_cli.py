"""litzoo's LightningCLI: resumable runs that never overwrite each other, and ``--help`` that lists the methods.

On top of Lightning's CLI:

* ``--overwrite true`` is the only way to reuse a run folder that holds another run's ``config.yaml``
  (:class:`callbacks.save_config.LoggerSaveConfigCallback` refuses otherwise);
* every checkpoint callback without an explicit ``save_last`` keeps a ``last.ckpt``;
* ``--ckpt_path last`` resumes the newest ``last.ckpt`` under the run's logger folder (or
  ``trainer.default_root_dir``), and a resumed run writes into the folder of the checkpoint's version, so
  its CSV metrics continue the same file;
* model arguments given on the command line next to ``--ckpt_path`` must agree with the checkpoint's
  hyper-parameters (Lightning would silently replace them with the checkpoint's): a conflict is refused.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.trainer import Trainer

_MODEL_ARG = re.compile(r"^--model\.(?:init_args\.)?(\w+)(?:=(.*))?$")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of the epilog (the list of classes) instead of re-flowing it."""


def _get(namespace: Any, dotted: str, default: Any = None) -> Any:
    node = namespace
    for part in dotted.split("."):
        if node is None:
            return default
        node = node.get(part) if isinstance(node, (dict, Namespace)) else getattr(node, part, None)
    return default if node is None else node


def find_last_checkpoint(config: Namespace) -> Path | None:
    """The newest ``last*.ckpt`` a run of ``config`` would have written (logger folder, checkpoint dirpaths,
    ``trainer.default_root_dir``)."""
    roots = []
    logger = _get(config, "trainer.logger")
    if isinstance(logger, (dict, Namespace)):
        save_dir, name = _get(logger, "init_args.save_dir"), _get(logger, "init_args.name") or _get(logger, "init_args.project")
        if save_dir:
            roots.append(Path(save_dir) / (name or ""))
    for callback in _get(config, "trainer.callbacks") or []:
        if str(_get(callback, "class_path", "")).endswith("ModelCheckpoint") and _get(callback, "init_args.dirpath"):
            roots.append(Path(_get(callback, "init_args.dirpath")))
    roots.append(Path(_get(config, "trainer.default_root_dir") or "."))
    found = [p for root in roots if root.is_dir() for p in root.rglob("last*.ckpt")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


class LitzooCLI(LightningCLI):
    """LightningCLI with the behaviours listed in the module docstring; see ``train.cli_main``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="reuse a run folder that holds an earlier run (its config.yaml is replaced)")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self.cli_args = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:] if args is None else []
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        config = self.config[sub] if sub else self.config
        if sub and config.get("ckpt_path") == "last":
            last = find_last_checkpoint(config)
            if last is None:
                raise FileNotFoundError(
                    f"--ckpt_path last: no last.ckpt under {_get(config, 'trainer.default_root_dir') or '.'} or the "
                    "logger folder; run once without --ckpt_path first, or give the checkpoint's path"
                )
            config.ckpt_path = str(last)

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        if not sub:
            return
        config = self.config[sub]
        ckpt = config.get("ckpt_path")
        if not ckpt or not Path(ckpt).is_file():
            return
        self._refuse_replaced_model_args(config, Path(ckpt))
        # Resume into the checkpoint's own run folder (<save_dir>/<name>/<version>/checkpoints/x.ckpt).
        logger = _get(config, "trainer.logger")
        if isinstance(logger, Namespace) and Path(ckpt).parent.name == "checkpoints" and not _get(logger, "init_args.version"):
            version_dir = Path(ckpt).parent.parent
            save_dir, name = _get(logger, "init_args.save_dir"), _get(logger, "init_args.name")
            if save_dir and name and version_dir.parent.resolve() == (Path(save_dir) / name).resolve():
                logger.init_args.version = version_dir.name

    def _refuse_replaced_model_args(self, config: Namespace, ckpt: Path) -> None:
        """Lightning replaced the model's arguments by the checkpoint's; refuse command-line values it dropped."""
        argv = self.cli_args
        init_args = _get(config, "model.init_args") or _get(config, "model.dict_kwargs") or {}
        for i, arg in enumerate(argv):
            match = _MODEL_ARG.match(arg)
            if not match or match.group(1) in ("class_path", "init_args"):
                continue
            raw = match.group(2) if match.group(2) is not None else (argv[i + 1] if i + 1 < len(argv) else "")
            given, kept = yaml.safe_load(raw) if raw else raw, init_args.get(match.group(1))
            if given != kept and str(given) != str(kept):
                raise ValueError(
                    f"model.init_args.{match.group(1)}={raw} (command line) conflicts with the checkpoint {ckpt}, "
                    f"which was trained with {kept!r}; resuming keeps the checkpoint's hyper-parameters: drop the "
                    "argument, or start a new run without --ckpt_path"
                )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last is None:
                callback.save_last = True  # so that --ckpt_path last always has something to resume
        return trainer
