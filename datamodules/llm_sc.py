"""English sentences for LLM-SC and DeepSC, split by document into training, validation and test.

Demo source ``pydoc``: the 79 topics of CPython's documentation (``pydoc_data``, the text behind
``datamodules.sources.english_corpus``), one document per topic. Paper source: a folder of Europarl
v7 ``txt/en`` files (one document per file, XML tag lines dropped). Sentences are prose only (no
code blocks, ASCII, starting with a capital and ending with a full stop) and kept when the LM
tokenizer gives them ``min_tokens``..``max_tokens`` tokens. Documents with index % 5 == 0 are the
test set (nothing is trained or tuned on it), % 10 == 1 validation, the rest DeepSC's training set.

``LLMSCDataModule`` serves test batches of token ids for the LLM-SC evaluation module;
``DeepSCDataModule`` serves word ids (vocabulary built on the training split only) for DeepSC.
"""

from __future__ import annotations

import functools
import random
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from core.deepsc import WordVocab
from core.packaged_models import resolve_model
from core.text_metrics import normalise

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_NOT_PROSE = re.compile(r"[`*|{}\[\]=<>#\\]|::|\.\.\.|\.[a-z]|\(\)")  # code-like: markup, operators, calls


def _documents(source: str) -> list[str]:
    if source == "pydoc":
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)]
    folder = Path(source).expanduser()
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"data.init_args.source: {source!r} is neither 'pydoc' nor a folder of Europarl "
                                "*.txt files (statmt.org Europarl v7, txt/en)")
    return ["\n\n".join(line for line in f.read_text(errors="ignore").splitlines() if not line.startswith("<"))
            for f in files]


def prose_sentences(document: str) -> list[str]:
    """Prose sentences of a document; code, grammar rules and headings fail the sentence filter."""
    out = []
    for para in re.split(r"\n\s*\n", document):
        text = " ".join(line.strip() for line in para.splitlines())
        for sent in _SENTENCE_END.split(text):
            sent = re.sub(r"\s+", " ", sent).strip()
            if (sent.isascii() and sent[:1].isupper() and sent.endswith(".") and not _NOT_PROSE.search(sent)
                    and 5 <= len(sent.split()) <= 30):
                out.append(sent)
    return out


def split_sentences(source: str) -> dict[str, list[str]]:
    """``{"train", "val", "test"}`` sentence lists, split by document index (see the module), de-duplicated."""
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    seen: set[str] = set()
    for i, doc in enumerate(_documents(source)):
        split = "test" if i % 5 == 0 else "val" if i % 10 == 1 else "train"
        for sent in prose_sentences(doc):
            if sent not in seen:
                seen.add(sent)
                splits[split].append(sent)
    return splits


def load_tokenizer(name: str) -> Any:
    """The LM's tokenizer by alias, folder or hub id; a failure names ``data.init_args.tokenizer``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model(name))
    except OSError as err:
        hint = (" (build it once: python -c 'from datamodules.sources import smollm2_path; smollm2_path()')"
                if name == "smollm2" else " (paper: a local folder of the prior LM, e.g. vicuna-7b-v1.5)")
        raise FileNotFoundError(f"data.init_args.tokenizer: cannot load {name!r}{hint}: {err}") from err


def collate_tokens(rows: list[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Pad token-id rows to ``(S, T)``; keep lengths and texts."""
    lengths = torch.tensor([len(r["ids"]) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["ids"])] = torch.tensor(r["ids"])
    return {"ids": ids, "lengths": lengths, "text": [r["text"] for r in rows]}


def pad_words(rows: list[torch.Tensor], pad_id: int = 0) -> torch.Tensor:
    """Right-pad word-id rows to ``(B, T)``."""
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id)


class LLMSCDataModule(L.LightningDataModule):
    """Held-out test sentences as LM token ids.

    Args:
        tokenizer: the LM's tokenizer: ``smollm2``, a local folder or a hub id (paper: Vicuna-7B).
        source: ``pydoc`` (CPython docs, offline) or a folder of Europarl ``*.txt`` files.
        min_tokens: shortest sentence kept, in tokens (without special tokens).
        max_tokens: longest sentence kept, in tokens.
        num_test: sentences sampled from the test split (fixed ``seed``); None: all of them.
        batch_size: sentences decoded together (each becomes ``beam_width`` rows).
        seed: seed of the test-sentence sample.
    """

    def __init__(self, tokenizer: str = "smollm2", source: str = "pydoc", min_tokens: int = 10,
                 max_tokens: int = 40, num_test: int | None = 32, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 1 <= min_tokens <= max_tokens:
            raise ValueError(f"data.init_args.min_tokens/max_tokens must satisfy 1 <= min <= max, got "
                             f"{min_tokens}, {max_tokens}")
        self.rows: list[dict[str, Any]] = []
        self.vocab_ids: torch.Tensor | None = None
        self.tokenizer: Any = None

    def setup(self, stage: str | None = None) -> None:
        if self.rows:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer)
        self.rows = self.tokenize(split_sentences(hp.source)["test"])
        if hp.num_test is not None and hp.num_test < len(self.rows):
            self.rows = random.Random(hp.seed).sample(self.rows, hp.num_test)
        if not self.rows:
            raise ValueError(f"data.init_args: no test sentence of {hp.min_tokens}-{hp.max_tokens} tokens in "
                             f"{hp.source!r}; widen min_tokens/max_tokens")
        self.rows.sort(key=lambda r: len(r["ids"]))  # similar lengths per batch: fewer frozen rows

    def tokenize(self, sentences: list[str]) -> list[dict[str, Any]]:
        hp = self.hparams
        rows = [{"ids": self.tokenizer(s, add_special_tokens=False).input_ids, "text": s} for s in sentences]
        return [r for r in rows if hp.min_tokens <= len(r["ids"]) <= hp.max_tokens]

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=collate_tokens)


class DeepSCDataModule(L.LightningDataModule):
    """Word-id sentences for DeepSC: vocabulary from the training split, unknown words -> ``<UNK>``.

    Args:
        source: ``pydoc`` or a folder of Europarl ``*.txt`` files (as :class:`LLMSCDataModule`).
        max_words: longest normalised sentence kept (DeepSC: 30); longer ones are dropped.
        min_count: words seen fewer times in training become ``<UNK>``.
        batch_size: training batch size (DeepSC: 128).
        num_workers: DataLoader workers.
    """

    def __init__(self, source: str = "pydoc", max_words: int = 40, min_count: int = 1, batch_size: int = 64,
                 num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.vocab: WordVocab | None = None
        self.data: dict[str, list[torch.Tensor]] = {}
        self.text: dict[str, list[str]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.vocab is not None:
            return
        hp = self.hparams
        splits = split_sentences(hp.source)
        self.vocab = WordVocab.build([normalise(s) for s in splits["train"]], min_count=hp.min_count)
        for split, sentences in splits.items():
            kept = [s for s in sentences if len(normalise(s).split()) <= hp.max_words]
            self.text[split] = kept
            self.data[split] = [self.vocab.encode(normalise(s)) for s in kept]
        if not self.data["train"]:
            raise ValueError(f"data.init_args.source: no training sentence in {hp.source!r}")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        pad = self.vocab.pad_id if self.vocab else 0
        return DataLoader(self.data[split], batch_size=self.hparams.batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers, collate_fn=functools.partial(pad_words, pad_id=pad))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
