"""Save the resolved LightningCLI config to the run directory and to the experiment loggers."""

from __future__ import annotations

import yaml
from lightning import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Also hand the full resolved config to every logger (W&B: the run's config panel).

    Lightning writes ``config.yaml`` into the log directory but does not pass the config to W&B.
    ``save_config`` runs on global rank 0 only, so nothing here may be a collective call.
    """

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})
