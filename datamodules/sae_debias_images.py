"""Caption -> image pairs with per-profession gender bias, for the demo's tiny text-to-image model.

No text-to-image weights ship offline, so the demo trains a small diffusion model here on a synthetic
world where gender can be counted. An image is two 16 px glyph planes (real printed glyphs from
:func:`datamodules.sources.render_glyphs`): channel 0 the profession's initial letter, channel 1 the
gender mark (U+2642 male, U+2640 female). Captions:

- neutral ("a photo of a nurse"): the mark is male with the profession's stereotyped share
  (:data:`~datamodules.sae_debias.MALE_SHARE`, e.g. nurse 10 %): the bias the model learns;
- explicit ("a photo of a female nurse", "a man working as a nurse"): the mark the caption names;
- empty (a ``uncond_fraction`` of samples): classifier-free guidance's unconditional caption.

Batches: ``{"caption": index into .captions, "image": (2, 16, 16) in [-1, 1], "gender", "profession"}``.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.sae_debias import MALE_SHARE, NEUTRAL_TEMPLATES, check_professions

MARKS = ("\u2640", "\u2642")  # index = gender (0 female, 1 male)
EXPLICIT_TEMPLATES = (("a photo of a {g} {p}", ("female", "male")), ("a {g} working as a {p}", ("woman", "man")))


def glyph_planes(professions: list[str], per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(P, per_class, size, size) letter glyphs and (2, per_class, size, size) gender marks, uint8."""
    from datamodules.sources import render_glyphs

    chars = [p[0].upper() for p in professions]
    if len(set(chars)) != len(chars):
        raise ValueError(f"data.init_args.professions: initials {chars} must be distinct (they are the image glyphs)")
    images, _, _ = render_glyphs(chars + list(MARKS), per_class=per_class, size=size, faces="all", seed=seed)
    images = images.reshape(len(chars) + 2, per_class, size, size)
    return images[: len(chars)], images[len(chars):]


def compose(letters: np.ndarray, marks: np.ndarray, profession: Tensor, gender: Tensor, instance: Tensor) -> Tensor:
    """(N, 2, H, W) images in [-1, 1] from glyph instance indices."""
    letter = torch.from_numpy(letters)[profession, instance]
    mark = torch.from_numpy(marks)[gender, instance]
    return torch.stack([letter, mark], 1).float() / 127.5 - 1.0


class CaptionImageSet(Dataset):
    """Caption indices with their images and labels (items are dicts of tensors).

    Args:
        captions: (N,) indices into the datamodule's ``captions``.
        images: (N, 2, H, W) images in [-1, 1].
        gender: (N,) 1 male, 0 female (the mark drawn).
        profession: (N,) profession indices (the letter drawn).
    """

    def __init__(self, captions: Tensor, images: Tensor, gender: Tensor, profession: Tensor) -> None:
        self.captions, self.images, self.gender, self.profession = captions, images, gender, profession

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"caption": self.captions[i], "image": self.images[i], "gender": self.gender[i],
                "profession": self.profession[i]}


class BiasedCaptionsDataModule(L.LightningDataModule):
    """Biased caption -> glyph-image pairs for every profession (training and held-out alike: the
    diffusion model must know all of them; only the SAE and the direction bank hold some out).

    Args:
        professions: professions drawn (their initials must be distinct).
        samples: caption/image pairs in the training set (drawn once, seeded).
        explicit_fraction: share of captions naming the gender (balanced male/female).
        uncond_fraction: share of empty captions (classifier-free guidance dropout).
        per_class: glyph instances rendered per letter and per mark.
        size: image side in pixels.
        batch_size: pairs per batch.
        seed: seed of the glyphs and of the drawing.
    """

    def __init__(self, professions: tuple[str, ...] = tuple(MALE_SHARE), samples: int = 20000, explicit_fraction: float = 0.4,
                 uncond_fraction: float = 0.1, per_class: int = 48, size: int = 16, batch_size: int = 64,
                 seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.professions = check_professions(list(professions), "data.init_args.professions")
        self.captions = [""]
        for p in self.professions:
            self.captions += [t.format(p=p) for t in NEUTRAL_TEMPLATES]
            self.captions += [t.format(g=words[g], p=p) for t, words in EXPLICIT_TEMPLATES for g in (0, 1)]

    def caption_index(self, caption: str) -> int:
        return self.captions.index(caption)

    def setup(self, stage: str | None = None) -> None:
        hp, g = self.hparams, torch.Generator().manual_seed(self.hparams.seed)
        self.letters, self.marks = glyph_planes(self.professions, hp.per_class, hp.size, hp.seed)
        n, n_prof = hp.samples, len(self.professions)
        profession = torch.randint(0, n_prof, (n,), generator=g)
        share = torch.tensor([MALE_SHARE[p] for p in self.professions])[profession]
        kind = torch.rand(n, generator=g)  # < uncond: empty; < uncond + explicit: explicit; else neutral
        explicit = (kind >= hp.uncond_fraction) & (kind < hp.uncond_fraction + hp.explicit_fraction)
        gender = torch.where(explicit, torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g) < share).long()
        per_prof = len(NEUTRAL_TEMPLATES) + 2 * len(EXPLICIT_TEMPLATES)
        neutral_pick = torch.randint(0, len(NEUTRAL_TEMPLATES), (n,), generator=g)
        explicit_pick = len(NEUTRAL_TEMPLATES) + 2 * torch.randint(0, len(EXPLICIT_TEMPLATES), (n,), generator=g) + gender
        caption = 1 + profession * per_prof + torch.where(explicit, explicit_pick, neutral_pick)
        caption = torch.where(kind < hp.uncond_fraction, torch.zeros_like(caption), caption)
        instance = torch.randint(0, hp.per_class, (n,), generator=g)
        images = compose(self.letters, self.marks, profession, gender, instance)
        self.train_set = CaptionImageSet(caption, images, gender, profession)

    def clean_set(self, per_combination: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
        """Clean renders of every (profession, gender) pair from fresh glyph instances (another seed):
        the attribute classifier's training data. Returns images, profession and gender labels."""
        letters, marks = glyph_planes(self.professions, per_combination, self.hparams.size, seed)
        profession = torch.arange(len(self.professions)).repeat_interleave(2 * per_combination)
        gender = torch.arange(2).repeat_interleave(per_combination).repeat(len(self.professions))
        instance = torch.arange(per_combination).repeat(2 * len(self.professions))
        return compose(letters, marks, profession, gender, instance), profession, gender

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(self.hparams.seed))
