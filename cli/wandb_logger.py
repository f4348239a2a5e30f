"""Weights & Biases logger that decides online vs offline from the user's setup, not from an import.

Online when ``WANDB_MODE`` says so (``online``/``run``) or when it is unset and the user is logged in
(``WANDB_API_KEY`` set, or ``wandb login`` wrote an ``api.wandb.ai`` entry to ``~/.netrc``); offline
otherwise, so a machine without an account still runs and keeps its files for ``wandb sync``. Give
``offline: true`` / ``false`` to force either.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

WANDB_HOST = "api.wandb.ai"


def wandb_logged_in() -> bool:
    """Whether W&B credentials are available: ``WANDB_API_KEY`` or a ``~/.netrc`` (``$NETRC``) entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(str(path)).authenticators(WANDB_HOST) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_offline() -> bool:
    """The offline choice when the config does not force one (see the module docstring)."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode:
        return mode in ("offline", "dryrun", "disabled")
    return not wandb_logged_in()


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` with ``offline`` decided by :func:`wandb_offline` unless given.

    Args:
        project: W&B project (also the run folder's parent: ``<save_dir>/<project>/<run id>``).
        name: display name of the run.
        save_dir: where the run's local files go.
        version: resume this W&B run id instead of starting a new one.
        offline: ``None`` decides from ``WANDB_MODE`` and the login state; ``True``/``False`` force it.
        log_model: upload checkpoints as W&B artifacts (``"all"``, ``True`` at the end, ``False`` never).
        prefix: prefix of every metric key.
        **kwargs: passed to ``wandb.init`` (entity, tags, group, ...).
    """

    def __init__(self, project: str = "litzoo", name: str | None = None, save_dir: str = "runs",
                 version: str | None = None, offline: bool | None = None,
                 log_model: Literal["all"] | bool = False, prefix: str = "", **kwargs: Any) -> None:
        super().__init__(name=name, save_dir=save_dir, version=version,
                         offline=wandb_offline() if offline is None else offline, project=project,
                         log_model=log_model, prefix=prefix, **kwargs)
