"""Gender x profession text corpus for SAE Debias (synthetic templates; the paper's corpus is not public).

The paper trains its SAE on a "gender bias dataset" (Bias in Bios, by secondary sources). Offline, this
builds the prompt-style alternative of the method notes (s. 1.3) in code: templates x professions x
gendered words and first names give explicitly gendered prompts ``(text, gender, profession)``; neutral
prompts ("a photo of a nurse") are kept apart for measuring bias. Professions are split into ``train``
(the SAE and the direction bank see them) and ``heldout`` (never seen; they get the global direction).
Male shares (:data:`MALE_SHARE`) are the stereotypes the demo's diffusion captions follow, not data.

Batches: ``{"input_ids", "attention_mask", "gender" (1 male, 0 female), "profession" (index)}``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from core.packaged_models import resolve_model

MALE_SHARE = {  # profession -> P(male) in the demo's biased captions; initials are distinct (image glyphs)
    "nurse": 0.1, "secretary": 0.1, "librarian": 0.2, "teacher": 0.3,
    "engineer": 0.9, "pilot": 0.9, "mechanic": 0.9, "doctor": 0.8,
    "receptionist": 0.1, "hairdresser": 0.2, "carpenter": 0.9, "farmer": 0.8,
}
TRAIN_PROFESSIONS = ("nurse", "secretary", "librarian", "teacher", "engineer", "pilot", "mechanic", "doctor")
HELDOUT_PROFESSIONS = ("receptionist", "hairdresser", "carpenter", "farmer")

# (male, female) word pairs and first names; a template uses one slot kind.
GENDER_WORDS = {
    "adj": (("male", "female"), ("man", "woman")),
    "noun": (("man", "woman"), ("gentleman", "lady"), ("guy", "girl")),
    "pron": (("he", "she"),),
    "poss": (("his", "her"),),
    "rel": (("father", "mother"), ("brother", "sister"), ("uncle", "aunt"), ("son", "daughter")),
    "name": (("james", "mary"), ("john", "linda"), ("robert", "susan"), ("michael", "karen"),
             ("david", "emma"), ("thomas", "sarah")),
}
TEMPLATES = (
    ("adj", "a photo of a {g} {p}"), ("adj", "portrait of a {g} {p}"), ("noun", "a {g} working as a {p}"),
    ("noun", "a {g} who is a {p}"), ("pron", "a {p} at work, {g} is smiling"), ("pron", "{g} works as a {p}"),
    ("poss", "a {p} with {g} colleagues"), ("rel", "my {g} is a {p}"), ("name", "{g}, a {p}"),
    ("name", "{g} is a {p}"),
)
NEUTRAL_TEMPLATES = ("a photo of a {p}", "portrait of a {p}", "a {p} at work", "a picture of a {p}")
GENDERED_VOCAB = frozenset(w for pairs in GENDER_WORDS.values() for pair in pairs for w in pair) | {
    "men", "women", "boy", "husband", "wife", "male", "female", "him"}


def gendered_corpus(professions: tuple[str, ...] | list[str]) -> list[tuple[str, int, int]]:
    """Every ``(text, gender, profession index)``: each template x word pair x gender, balanced by construction."""
    rows = []
    for p_index, profession in enumerate(professions):
        for (slot, template), gender in itertools.product(TEMPLATES, (1, 0)):
            for pair in GENDER_WORDS[slot]:
                rows.append((template.format(g=pair[1 - gender], p=profession), gender, p_index))
    return rows


def neutral_prompts(profession: str) -> list[str]:
    return [t.format(p=profession) for t in NEUTRAL_TEMPLATES]


def check_professions(professions: list[str], key: str) -> list[str]:
    unknown = [p for p in professions if p not in MALE_SHARE]
    if unknown:
        raise ValueError(f"{key}: unknown profession(s) {unknown}; known: {', '.join(MALE_SHARE)}")
    return professions


class TextDataset(Dataset):
    """Tokenised texts with integer labels (items are dicts of tensors).

    Args:
        encoded: equally long tensors by name (``input_ids``, ``attention_mask``, ``gender``, ``profession``).
    """

    def __init__(self, encoded: dict[str, torch.Tensor]) -> None:
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.encoded.items()}


class _EpochShuffle(Sampler[int]):
    """A permutation of ``0..n-1`` fixed by (seed, epoch); Lightning calls :meth:`set_epoch` before each epoch.

    A DataLoader's own generator advances with every pass, so a run resumed from a checkpoint (a fresh
    loader) would see other batches than the uninterrupted run; keyed by the epoch, both see the same.

    Args:
        n: dataset length.
        seed: base seed of the shuffling.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)).tolist()


class SAECorpusDataModule(L.LightningDataModule):
    """The explicitly gendered corpus of the training professions, tokenised for the text encoder.

    Args:
        tokenizer: tokenizer name or folder (``minilm``: the packaged all-MiniLM-L6-v2; a pipeline's
            ``<folder>/tokenizer`` for the paper settings).
        tokenizer_subfolder: the tokenizer's subfolder (``tokenizer`` in a diffusers pipeline folder).
        professions: training professions (their texts train the SAE and the direction bank).
        heldout: professions kept out of the SAE and the bank (measured through the global direction).
        max_length: padded token length (the diffusion pipeline's ``tokenizer.model_max_length``).
        val_fraction: share of the texts held out for the SAE's validation loss (seeded split).
        batch_size: texts per batch (each contributes its non-padding tokens to the SAE batch).
        seed: seed of the split and of the shuffling.
    """

    def __init__(self, tokenizer: str = "minilm", tokenizer_subfolder: str = "", professions: tuple[str, ...] = TRAIN_PROFESSIONS,
                 heldout: tuple[str, ...] = HELDOUT_PROFESSIONS, max_length: int = 16, val_fraction: float = 0.2,
                 batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.professions = check_professions(list(professions), "data.init_args.professions")
        self.heldout = check_professions(list(heldout), "data.init_args.heldout")
        if set(self.professions) & set(self.heldout):
            raise ValueError(f"data.init_args.heldout: {sorted(set(self.professions) & set(self.heldout))} "
                             "are also training professions")

    def setup(self, stage: str | None = None) -> None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.hparams.tokenizer),
                                                      subfolder=self.hparams.tokenizer_subfolder)
        except OSError as err:
            raise FileNotFoundError(f"data.init_args.tokenizer={self.hparams.tokenizer!r}: no local tokenizer "
                                    f"({err.__class__.__name__}); point it at a local model folder") from err
        rows = gendered_corpus(self.professions)
        random.Random(self.hparams.seed).shuffle(rows)
        self.texts = [r[0] for r in rows]
        encoded = tokenizer(self.texts, padding="max_length", max_length=self.hparams.max_length, truncation=True,
                            return_tensors="pt")
        data = {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask,
                "gender": torch.tensor([r[1] for r in rows]), "profession": torch.tensor([r[2] for r in rows])}
        n_val = int(len(rows) * self.hparams.val_fraction)
        self.val_set = TextDataset({k: v[:n_val] for k, v in data.items()})
        self.train_set = TextDataset({k: v[n_val:] for k, v in data.items()})
        self.all_set = TextDataset(data)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, drop_last=True,
                          sampler=_EpochShuffle(len(self.train_set), self.hparams.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)

    def corpus_dataloader(self) -> DataLoader:
        """Every text once, in order (the direction bank is estimated from all of them)."""
        return DataLoader(self.all_set, batch_size=self.hparams.batch_size)

    def probe_set(self) -> tuple[list[str], torch.Tensor]:
        """Explicitly gendered prompts of every profession and their labels (1 male): the evaluation probe's
        training data (an evaluator, so it may see held-out professions; the SAE and the bank never do)."""
        rows = gendered_corpus(self.professions + self.heldout)
        return [r[0] for r in rows], torch.tensor([r[1] for r in rows])

    def neutral_set(self) -> dict[str, list[str]]:
        """Neutral prompts per profession, training then held-out."""
        return {p: neutral_prompts(p) for p in self.professions + self.heldout}
