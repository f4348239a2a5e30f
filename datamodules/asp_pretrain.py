"""Images for pre-training ASP's small ViT offline, on classes disjoint from the 100 FSCIL glyph classes.

The paper's backbone is an ImageNet-pretrained ViT-B/16; offline, a tiny ViT is pre-trained here so that its
frozen features mean something. Sources (concatenated, each with its own label block): ``glyphs`` (the glyph
source's ``pretrain`` split: every glyph class outside ``fscil``), ``mnist5k`` and ``digits`` (handwritten
digits, upsampled; by default without the digits that are also FSCIL glyph classes: 2-6, 8 and 9 are, so
only 0, 1 and 7 stay, ``fscil_digits: true`` keeps all ten). All are white ink on black and normalised with the stream's glyph statistics, so the
backbone sees at pre-training the same input distribution as in the FSCIL stream.
Batches are dicts ``image`` (B, 1, S, S), ``label`` (B,).
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from core.rng import keyed_generator
from datamodules.class_incremental import STATS, StreamSet, per_class_split

Source = Literal["glyphs", "mnist5k", "digits"]


def load_source(name: Source, size: int, glyph_per_class: int, fscil_digits: bool) -> tuple[Tensor, Tensor]:
    """(N, 1, size, size) images in [0, 1] and labels 0..K-1 of one pre-training source."""
    from datamodules import sources

    splits = sources.glyph_splits(seed=0)
    if name == "glyphs":
        images, labels, _ = sources.render_glyphs(splits["pretrain"], per_class=glyph_per_class, size=size, seed=1)
        return torch.as_tensor(images)[:, None].float() / 255.0, torch.as_tensor(labels)
    images, labels = sources.mnist5k() if name == "mnist5k" else sources.sklearn_digits()
    if not fscil_digits:  # keep the pre-training classes disjoint from the FSCIL characters
        kept = torch.tensor([d for d in range(10) if str(d) not in splits["fscil"]])
        keep = torch.isin(labels, kept)
        images, labels = images[keep], torch.searchsorted(kept, labels[keep])
    if images.shape[-1] != size:
        images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    return images, labels


class PretrainImages(L.LightningDataModule):
    """Labelled pre-training images from several offline sources, one label block per source.

    Args:
        sources: which sources to concatenate (``glyphs``, ``mnist5k``, ``digits``).
        image_size: side of the images (the FSCIL stream's size).
        glyph_per_class: rendered images per glyph class (other rendering seed than the stream's).
        fscil_digits: keep the handwritten digits whose character is also an FSCIL glyph class.
        val_per_class: images per class held out for validation.
        batch_size: training batch size.
        eval_batch_size: validation batch size.
        seed: seed of the split and of the batch order.
    """

    def __init__(self, sources: list[Source] | None = None, image_size: int = 28, glyph_per_class: int = 20,
                 fscil_digits: bool = False, val_per_class: int = 3, batch_size: int = 64, eval_batch_size: int = 256, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.sources = list(sources or ["glyphs", "mnist5k", "digits"])
        unknown = sorted(set(self.sources) - {"glyphs", "mnist5k", "digits"})
        if unknown or not self.sources:
            raise ValueError(f"data.init_args.sources: unknown or empty {unknown or self.sources}; use glyphs, "
                             f"mnist5k, digits")
        self.num_classes = 0
        self.splits: dict[str, StreamSet] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        images, labels, offset = [], [], 0
        for name in self.sources:
            x, y = load_source(name, hp.image_size, hp.glyph_per_class, hp.fscil_digits)
            images.append(x)
            labels.append(y + offset)
            offset += int(y.max()) + 1
        self.num_classes = offset
        images, labels = torch.cat(images), torch.cat(labels)
        val, train = per_class_split(labels, (hp.val_per_class,), hp.seed)
        mean, std = (torch.tensor(v) for v in STATS["glyphs"])
        zeros = torch.zeros_like(labels)
        self.splits = {part: StreamSet(images[idx], labels[idx], zeros[idx], mean, std)
                       for part, idx in (("train", train), ("val", val))}

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return DataLoader(self.splits["train"], batch_size=self.hparams.batch_size, shuffle=True,
                          generator=keyed_generator(self.hparams.seed, 29, epoch))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.hparams.eval_batch_size)
