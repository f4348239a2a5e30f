"""Data of data-free meta-learning: no training images (the zoo is the training signal), only the
fixed evaluation episodes of the held-out splits and a resumable step source for training.

Used by ``lit_modules.free.FREEModule`` (and tgr). Validation runs on ``meta_val`` episodes (model
selection); test on ``meta_test``. ``val_split: meta_test`` reproduces the release, which selects the
reported model on the test episodes.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
from torch.utils.data import DataLoader

from core.episodes import sample_episodes
from core.resumable_range import ResumableRange
from core.rng import keyed_generator
from datamodules.few_shot import EpisodeSet, labelled_split


class FewShotEpisodes(L.LightningDataModule):
    """Evaluation episodes of meta_val / meta_test and ``steps_per_epoch`` training steps.

    Args:
        source: ``glyphs``, ``mnist5k``, ``digits`` (smoke) or ``folder`` (see ``datamodules.few_shot``).
        root: dataset root for ``source: folder``.
        image_size: side of the images.
        channels: image channels.
        per_class: images rendered/loaded per class (0: all, for folders).
        n_way: classes per episode.
        k_shot: support images per class.
        q_query: query images per class.
        val_episodes: episodes of the validation split.
        test_episodes: episodes of the test split (600 for reported numbers).
        val_split: split used for model selection: ``meta_val`` (default) or ``meta_test`` (release).
        episodes_per_batch: episodes per evaluation batch (evaluated together, batched).
        steps_per_epoch: training steps (method iterations) per Lightning epoch.
        seed: seed of the data and of the episode draw.
    """

    def __init__(self, source: str = "glyphs", root: str | None = None, image_size: int = 28, channels: int = 1,
                 per_class: int = 20, n_way: int = 5, k_shot: int = 5, q_query: int = 15,
                 val_episodes: int = 100, test_episodes: int = 600,
                 val_split: Literal["meta_val", "meta_test"] = "meta_val", episodes_per_batch: int = 100,
                 steps_per_epoch: int = 20, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        if val_split not in ("meta_val", "meta_test"):
            raise ValueError(f"data.init_args.val_split={val_split!r}: use meta_val or meta_test")
        self.sets: dict[str, EpisodeSet] = {}

    def _episodes(self, split: str, n_episodes: int, key: int) -> EpisodeSet:
        hp = self.hparams
        images, labels, _ = labelled_split(hp.source, split, hp.per_class, hp.image_size, hp.channels, hp.seed,
                                           hp.root)
        try:
            idx = sample_episodes(labels, hp.n_way, hp.k_shot, hp.q_query, n_episodes, keyed_generator(hp.seed, key))
        except ValueError as err:
            raise ValueError(f"data.init_args (n_way={hp.n_way}, k_shot={hp.k_shot}, q_query={hp.q_query}) on "
                             f"{hp.source}/{split}: {err}") from err
        return EpisodeSet(images, idx, hp.k_shot)

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage in ("fit", "validate") and "val" not in self.sets:
            self.sets["val"] = self._episodes(hp.val_split, hp.val_episodes, 1)
        if stage == "test" and "test" not in self.sets:
            self.sets["test"] = self._episodes("meta_test", hp.test_episodes, 2)

    def train_dataloader(self) -> ResumableRange:
        return ResumableRange(self.hparams.steps_per_epoch)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["val"], batch_size=self.hparams.episodes_per_batch)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["test"], batch_size=self.hparams.episodes_per_batch)
