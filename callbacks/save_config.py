"""Save the resolved LightningCLI config into the run's own folder and hand it to the experiment loggers."""

from __future__ import annotations

import yaml
from lightning import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback

from core.run_dir import run_directory


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Write ``config.yaml`` into :func:`core.run_dir.run_directory` (W&B runs included) and log it.

    A folder that already holds another run's ``config.yaml`` is refused unless the config says
    ``overwrite: true``; a run resumed with ``--ckpt_path`` keeps the original file and adds
    ``config.resume-<n>.yaml``. ``save_config`` runs on global rank 0 only (no collective calls there).
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        folder = run_directory(trainer)  # collective: every rank calls it
        path = folder / self.config_filename
        exists = trainer.strategy.broadcast(path.is_file() if trainer.is_global_zero else False)
        overwrite = bool(self.config.get("overwrite")) or self.overwrite
        resuming = bool(self.config.get("ckpt_path"))
        if exists and not (overwrite or resuming):
            raise FileExistsError(
                f"{path} exists: that run folder holds an earlier run. Leave trainer.logger.init_args.version unset "
                "(a new version folder), choose another version or trainer.default_root_dir, or pass --overwrite true"
            )
        if trainer.is_global_zero:
            target = path
            if exists and resuming and not overwrite:
                n = 1
                while (target := folder / f"config.resume-{n}.yaml").exists():
                    n += 1
            folder.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(target), skip_none=False, overwrite=True, multifile=self.multifile)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})
