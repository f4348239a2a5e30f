"""Data of TGR: FREE's evaluation episodes and step source, plus the probe network's training images.

The task embedding needs a probe trained on classes that no teacher and no evaluation split uses. With
the glyph source the probe takes the *last* ``probe_classes`` classes of ``meta_train``, which the zoo
stage leaves out of every teacher's class draw (``datamodules.model_zoo.ZooData(probe_classes=...)``);
meta_val (model selection) and meta_test (evaluation) stay untouched. ``lit_modules.tgr`` checks that
no teacher was trained on a probe class.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from datamodules.few_shot import labelled_split
from datamodules.free import FewShotEpisodes


class TGRData(FewShotEpisodes):
    """Evaluation episodes (see ``datamodules.free.FewShotEpisodes``) and the probe's images.

    Args:
        source: ``glyphs``, ``mnist5k``, ``digits`` (smoke) or ``folder``.
        root: dataset root for ``source: folder``.
        image_size: side of the images.
        channels: image channels.
        per_class: images rendered/loaded per class of the evaluation splits (0: all, for folders).
        n_way: classes per episode.
        k_shot: support images per class.
        q_query: query images per class.
        val_episodes: episodes of the validation split.
        test_episodes: episodes of the test split (600 for reported numbers).
        val_split: split used for model selection: ``meta_val`` (default) or ``meta_test`` (release).
        episodes_per_batch: episodes per evaluation batch.
        steps_per_epoch: training steps per Lightning epoch.
        seed: seed of the data and of the episode draw.
        probe_split: split holding the probe's classes (the release's probe is ImageNet-trained instead).
        probe_classes: the last this many classes of ``probe_split`` train the probe (0: no probe data,
            for a probe loaded from weights).
        probe_per_class: images per probe class.
    """

    def __init__(self, source: str = "glyphs", root: str | None = None, image_size: int = 28, channels: int = 1,
                 per_class: int = 20, n_way: int = 5, k_shot: int = 5, q_query: int = 15,
                 val_episodes: int = 100, test_episodes: int = 600,
                 val_split: Literal["meta_val", "meta_test"] = "meta_val", episodes_per_batch: int = 100,
                 steps_per_epoch: int = 20, seed: int = 0, probe_split: str = "meta_train", probe_classes: int = 12,
                 probe_per_class: int = 40) -> None:
        super().__init__(source, root, image_size, channels, per_class, n_way, k_shot, q_query, val_episodes,
                         test_episodes, val_split, episodes_per_batch, steps_per_epoch, seed)
        self.save_hyperparameters()

    def probe_set(self) -> tuple[Tensor, Tensor, list[str]]:
        """``(images, labels 0..probe_classes-1, class names)`` of the probe's classes."""
        hp = self.hparams
        if hp.probe_classes < 1:
            raise ValueError("data.init_args.probe_classes=0 but the probe is trained here: set probe_classes "
                             "(the classes the zoo stage reserved) or give model.init_args.probe weights")
        images, labels, names = labelled_split(hp.source, hp.probe_split, hp.probe_per_class, hp.image_size,
                                               hp.channels, hp.seed, hp.root)
        if hp.probe_classes >= len(names):
            raise ValueError(f"data.init_args.probe_classes={hp.probe_classes} leaves no class of "
                             f"{hp.source}/{hp.probe_split} ({len(names)} classes) for the teachers")
        first = len(names) - hp.probe_classes
        keep = labels >= first
        return images[keep], labels[keep] - first, names[first:]
