"""CSV logger whose metrics file survives a resumed run: rows are appended, never deleted.

Lightning's CSV writer deletes an existing ``metrics.csv`` when its folder is reused, so resuming a run into
its own version folder loses every row logged before the checkpoint. Reusing a folder for an unrelated run is
refused earlier (:class:`callbacks.save_config.LoggerSaveConfigCallback`), so appending is always right here.
"""

from __future__ import annotations

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):  # continue the header of the earlier rows
            with self._fs.open(self.metrics_file_path, "r") as handle:
                header = handle.readline().strip()
            self.metrics_keys = sorted(filter(None, header.split(",")))

    def _check_log_dir_exists(self) -> None:
        """Keep earlier files (Lightning's writer deletes metrics.csv here; this private hook is the only seam)."""


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` (same arguments) that appends to an existing ``metrics.csv``."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
