"""The one folder a run writes into, whatever the logger: config, checkpoints, images, plots, exports.

Lightning's ``trainer.log_dir`` is the version folder for the CSV and TensorBoard loggers but the shared
``save_dir`` for W&B, so runs logged to W&B would write into one folder and overwrite each other's files.
This module resolves W&B runs to ``<save_dir>/<project>/<run id>``, the folder where Lightning's
``ModelCheckpoint`` already puts their checkpoints. Pure Python on duck-typed trainer/logger objects (core/
never imports lightning).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_directory(trainer: Any) -> Path:
    """The run folder of ``trainer`` (created by nobody here).

    * no logger: ``trainer.default_root_dir``;
    * a logger with a ``log_dir`` (CSV, TensorBoard): that version folder;
    * otherwise (W&B, MLflow, ...): ``<save_dir or default_root_dir>/<name>/<version>``.

    Every rank gets the same answer: the W&B run id is broadcast from rank 0, where the run lives.
    """
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir)
    log_dir = getattr(logger, "log_dir", None)
    if log_dir:
        return Path(log_dir)
    version = logger.version
    if version is None and trainer.is_global_zero:
        _ = logger.experiment  # W&B creates the run (and its id) on first access, on rank 0 only
        version = logger.version
    version = trainer.strategy.broadcast(version)
    save_dir = logger.save_dir or trainer.default_root_dir
    return Path(save_dir) / str(logger.name) / str(version if isinstance(version, str) else f"version_{version}")
