"""Sentence-level text metrics of semantic communication: BLEU-n on normalised words, MiniLM similarity.

Every system is scored on the same normalisation (lower case, words and punctuation marks as separate
tokens, the DeepSC convention), so a closed-vocabulary word model and a BPE model compare fairly.
BLEU is per sentence and averaged over sentences (as DeepSC and LLM-SC report it), with the
transmitted sentence as the reference and the decoded one as the hypothesis; BLEU-4 uses add-one
smoothing of the higher n-gram precisions (Lin and Och 2004) so that short sentences are not all 0.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.text import bleu_score

_WORD = re.compile(r"\w+|[^\w\s]")


def normalise(text: str) -> str:
    """Lower case, words and punctuation split by single spaces: ``"It's 3." -> "it ' s 3 ."``."""
    return " ".join(_WORD.findall(text.lower()))


def sentence_bleu(references: list[str], hypotheses: list[str], n_gram: int) -> Tensor:
    """``(S,)`` BLEU-``n_gram`` of each hypothesis against its reference (normalised words)."""
    scores = [bleu_score([normalise(hyp)], [[normalise(ref)]], n_gram=n_gram, smooth=n_gram > 1)
              for ref, hyp in zip(references, hypotheses, strict=True)]
    return torch.stack(scores).float() if scores else torch.zeros(0)


class SentenceSimilarity:
    """Cosine similarity of sentence embeddings (the DeepSC paper's metric, with MiniLM instead of BERT).

    Args:
        path: local sentence-transformers folder (e.g. ``core.packaged_models.resolve_model("minilm")``).
        batch_size: sentences per encoder call.
    """

    def __init__(self, path: str, batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        self.model: Any = SentenceTransformer(path, device="cpu")
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, references: list[str], hypotheses: list[str]) -> Tensor:
        """``(S,)`` cosine similarities in [-1, 1]."""
        if not references:
            return torch.zeros(0)
        emb = self.model.encode(references + hypotheses, batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        ref, hyp = emb[: len(references)], emb[len(references):]
        return (ref * hyp).sum(-1).float().cpu()


def sentence_scores(references: list[str], hypotheses: list[str],
                    similarity: SentenceSimilarity | None = None) -> dict[str, Tensor]:
    """``{"bleu1", "bleu4"[, "similarity"]}``: ``(S,)`` per-sentence scores."""
    out = {"bleu1": sentence_bleu(references, hypotheses, 1), "bleu4": sentence_bleu(references, hypotheses, 4)}
    if similarity is not None:
        out["similarity"] = similarity(references, hypotheses)
    return out
