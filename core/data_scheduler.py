"""The two data schedulers of Bayesian Data Scheduler: per-sample logits and an amortized network.

Hu et al., "Adaptive Defense against Harmful Fine-Tuning for Large Language Models via Bayesian Data
Scheduler", NeurIPS 2025. The scheduler holds the latent safety attribute w of every fine-tuning
sample:

- :class:`ScalarScheduler`: one free logit per sample of the fine-tuning set (posterior over w
  directly). The softmax runs over all N logits, so every step moves all of them (Eq. 8).
- :class:`NeuralScheduler`: w_i = N(z_i; phi), a text encoder, pooling and a linear head (Eq. 11).
  It weights samples it has never seen, so a trained scheduler transfers to a new fine-tuning set
  without retraining. The release fed the LLM's token ids into the encoder's (different) vocabulary;
  here the encoder tokenises the raw text with its own tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from core.sample_weights import Transform, transform_weights

Pooling = Literal["mean", "first", "last"]
HEAD_FILE = "head.safetensors"
CONFIG_FILE = "scheduler_config.json"


class ScalarScheduler(nn.Module):
    """One logit per fine-tuning sample, all initialised to ``init`` (uniform weights).

    Args:
        num_samples: size N of the fine-tuning set (dataset indices are 0..N-1).
        init: initial value of every logit (release: 0.1).
    """

    def __init__(self, num_samples: int, init: float = 0.1) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"a scalar scheduler needs at least one fine-tuning sample, got {num_samples}")
        self.logits = nn.Parameter(torch.full((num_samples,), float(init)))

    def all_weights(self, transform: Transform) -> Tensor:
        """(N,) weights of every sample; softmax normalises over the whole set (mean weight 1)."""
        return transform_weights(self.logits, transform)

    def weights(self, index: Tensor, transform: Transform) -> Tensor:
        """(B,) weights of the samples ``index``, differentiable w.r.t. all N logits."""
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.logits.numel()):
            raise IndexError(
                f"dataset index {int(index.max())} outside the scheduler's {self.logits.numel()} samples; "
                "the fine-tuning set changed size since the scheduler was created"
            )
        return self.all_weights(transform)[index]


def pool_hidden(hidden: Tensor, attention_mask: Tensor, pooling: Pooling) -> Tensor:
    """(B, D) summary of (B, T, D) right-padded hidden states: masked mean, first or last real token."""
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    if pooling == "first":
        return hidden[:, 0]
    if pooling == "last":
        last = attention_mask.long().sum(1).clamp_min(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}; choose mean, first or last")


class NeuralScheduler(nn.Module):
    """Amortized scheduler: ``encoder`` (a Hugging Face ``AutoModel``) -> pooling -> ``Linear(D, 1)``.

    The head starts at zero, so the first weights are uniform, like the scalar scheduler's.

    Args:
        encoder: Hugging Face id or local folder of the text encoder (its own tokenizer is used).
        pooling: how token states become one vector: ``mean`` (release default), ``first``, ``last``.
        max_length: encoder tokens per sample (longer texts are truncated).
    """

    def __init__(self, encoder: str, pooling: Pooling = "mean", max_length: int = 128) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        pool_hidden(torch.zeros(1, 1, 1), torch.ones(1, 1), pooling)  # validates ``pooling``
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(encoder)
            self.encoder = AutoModel.from_pretrained(encoder, dtype=torch.float32)
        except OSError as err:
            raise FileNotFoundError(f"scheduler encoder {encoder!r} not found locally ({err})") from err
        self.pooling, self.max_length = pooling, max_length
        self.head = nn.Linear(self.encoder.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Fixed-length (B, max_length) ids and mask, so that ranks can all-gather them."""
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(pool_hidden(hidden, attention_mask, self.pooling)).squeeze(-1)

    def batch_weights(self, input_ids: Tensor, attention_mask: Tensor, transform: Transform) -> Tensor:
        """(B,) weights of one batch; softmax normalises over the batch (B * softmax, as released)."""
        return transform_weights(self(input_ids, attention_mask), transform)

    @torch.no_grad()
    def score_texts(self, texts: list[str], batch_size: int = 64) -> Tensor:
        """(n,) logits of any texts (higher = more trusted), e.g. to weight a new fine-tuning set."""
        device = self.head.weight.device
        outs = []
        for start in range(0, len(texts), batch_size):
            ids, mask = self.tokenize(texts[start : start + batch_size])
            outs.append(self(ids.to(device), mask.to(device)).float().cpu())
        return torch.cat(outs) if outs else torch.zeros(0)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``encoder/`` (safetensors + tokenizer), ``head.safetensors`` and the config."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(folder / "encoder")
        self.tokenizer.save_pretrained(folder / "encoder")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(folder / HEAD_FILE))
        config = {"pooling": self.pooling, "max_length": self.max_length}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> NeuralScheduler:
        """Reload a scheduler written by :meth:`save_pretrained`."""
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{folder} holds no saved neural scheduler ({CONFIG_FILE} missing)")
        config = json.loads((folder / CONFIG_FILE).read_text())
        scheduler = cls(str(folder / "encoder"), **config)
        scheduler.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
        return scheduler
